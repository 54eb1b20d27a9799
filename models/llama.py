"""Llama family: Llama 2/3/3.x, Mistral, Qwen2, Qwen3, SmolLM/SmolLM2.

The variants differ only in config flags, all read once in ``LlamaConfig.from_hf``:

    Llama 3.x   rope_type="llama3" scaling of the rotary frequencies
    Mistral     sliding-window attention on every layer (when ``sliding_window`` is set)
    Qwen2       q/k/v biases (no o bias); sliding window on layers marked "sliding_attention"
    Qwen3       RMSNorm on each q and k head before rope; explicit ``head_dim``
    SmolLM2     tied input/output embeddings

Letters in einsums and shape comments follow ``models/GLOSSARY.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpage.models.attention import AttentionMetadata, paged_attention
from jaxpage.models.layers import (RMSNorm, RopeConfig, apply_rope, get_activation, param,
                                   rope_cos_sin, zeros)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static, hashable model config. Build it from an HF ``config.json`` dict with ``from_hf``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] | None = None  # per layer; None = full attention
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        model_type = hf.get("model_type", "llama")
        num_layers = int(hf["num_hidden_layers"])
        attention_bias = bool(hf.get("attention_bias", False))
        window = hf.get("sliding_window")
        if model_type == "mistral":
            windows = [window] * num_layers
        elif model_type in ("qwen2", "qwen3"):
            layer_types = hf_layer_types(hf, [
                "sliding_attention" if hf.get("use_sliding_window") and i >= hf.get("max_window_layers", 0)
                else "full_attention" for i in range(num_layers)])
            windows = [window if t == "sliding_attention" else None for t in layer_types]
        else:
            windows = [None] * num_layers
        return cls(
            **hf_dims(hf, default_max_positions=2048),
            rope=RopeConfig.from_hf(hf),
            hidden_act=hf.get("hidden_act", "silu"),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_windows=tuple(None if w is None else int(w) for w in windows),
        )


def hf_layer_types(hf: dict[str, Any], default: list[str]) -> list[str]:
    """The config's ``layer_types`` (one per layer) or, when it has none, ``default``."""
    types = hf.get("layer_types") or default
    if len(types) != int(hf["num_hidden_layers"]):
        raise ValueError(f"config.json: layer_types names {len(types)} layers but "
                         f"num_hidden_layers is {hf['num_hidden_layers']}.")
    return list(types)


def hf_dims(hf: dict[str, Any], *, default_max_positions: int) -> dict[str, Any]:
    """The sizes every Llama-like config reads alike from an HF ``config.json`` dict."""
    num_heads = int(hf["num_attention_heads"])
    return dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=num_heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", default_max_positions)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


class LlamaAttention(nnx.Module):
    """GQA attention over the paged pool. Gemma (``gemma.py``) reuses it with its own norm
    class for q/k, its score scale and its tanh cap on the scores."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 norm_cls: type = RMSNorm, sm_scale: float | None = None,
                 soft_cap: float | None = None):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        self.cfg = cfg
        self.dtype = dtype
        self.sm_scale = cfg.head_dim ** -0.5 if sm_scale is None else sm_scale
        self.soft_cap = soft_cap
        self.sliding_window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None
        self.q_proj = param(rngs, (D, N, H), param_dtype, std)
        self.k_proj = param(rngs, (D, K, H), param_dtype, std)
        self.v_proj = param(rngs, (D, K, H), param_dtype, std)
        self.o_proj = param(rngs, (N, H, D), param_dtype, std)
        self.q_bias = zeros((N, H), param_dtype) if cfg.qkv_bias else None
        self.k_bias = zeros((K, H), param_dtype) if cfg.qkv_bias else None
        self.v_bias = zeros((K, H), param_dtype) if cfg.qkv_bias else None
        self.o_bias = zeros((D,), param_dtype) if cfg.o_bias else None
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = norm_cls(H, **norm) if cfg.qk_norm else None
        self.k_norm = norm_cls(H, **norm) if cfg.qk_norm else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv_pages: jax.Array,
                 md: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        dt = self.dtype
        q = jnp.einsum("TD,DNH->TNH", x, self.q_proj[...].astype(dt))  # (T, N, H)
        k = jnp.einsum("TD,DKH->TKH", x, self.k_proj[...].astype(dt))  # (T, K, H)
        v = jnp.einsum("TD,DKH->TKH", x, self.v_proj[...].astype(dt))  # (T, K, H)
        if self.q_bias is not None:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before rope
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (T, N, H), (T, K, H)
        out, kv_pages = paged_attention(q, k, v, kv_pages, md, sm_scale=self.sm_scale,
                                        soft_cap=self.soft_cap,
                                        sliding_window=self.sliding_window)  # (T, N, H)
        y = jnp.einsum("TNH,NHD->TD", out, self.o_proj[...].astype(dt))  # (T, D)
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(dt)
        return y, kv_pages


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, F, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.dtype = dtype
        self.hidden_act = cfg.hidden_act
        self.gate_proj = param(rngs, (D, F), param_dtype, std)
        self.up_proj = param(rngs, (D, F), param_dtype, std)
        self.down_proj = param(rngs, (F, D), param_dtype, std)
        self.gate_bias = zeros((F,), param_dtype) if cfg.mlp_bias else None
        self.up_bias = zeros((F,), param_dtype) if cfg.mlp_bias else None
        self.down_bias = zeros((D,), param_dtype) if cfg.mlp_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        gate = jnp.einsum("TD,DF->TF", x, self.gate_proj[...].astype(dt))  # (T, F)
        up = jnp.einsum("TD,DF->TF", x, self.up_proj[...].astype(dt))  # (T, F)
        if self.gate_bias is not None:
            gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
        h = get_activation(self.hidden_act)(gate) * up  # (T, F)
        y = jnp.einsum("TF,FD->TD", h, self.down_proj[...].astype(dt))  # (T, D)
        if self.down_bias is not None:
            y = y + self.down_bias[...].astype(dt)
        return y


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = LlamaAttention(cfg, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, kv_pages, md):
        attn, kv_pages = self.self_attn(self.input_layernorm(x), cos, sin, kv_pages, md)  # (T, D)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))  # (T, D)
        return x, kv_pages


class LlamaForCausalLM(nnx.Module):
    """Decoder-only transformer over the paged KV pool; see the module docstring for variants.
    Gemma (``gemma.py``) subclasses it with its own layer and norm classes."""

    layer_cls: type = LlamaDecoderLayer
    norm_cls: type = RMSNorm

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype,
                                  cfg.initializer_range)  # (V, D)
        self.layers = nnx.List([
            self.layer_cls(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i in range(cfg.num_hidden_layers)])
        self.norm = self.norm_cls(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype,
                                  param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else param(
            rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype, cfg.initializer_range)  # (V, D)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_pages: list[jax.Array],
                 md: AttentionMetadata) -> tuple[jax.Array, list[jax.Array]]:
        """Runs one ragged step.

        Args:
            input_ids: (T,) int32 token ids, requests packed back to back.
            positions: (T,) int32 absolute position of each token in its request.
            kv_pages: one KV pool array per layer.
            md: the step's attention metadata.

        Returns:
            ((T, D) final-normed hidden states, the updated list of per-layer pools).
        """
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)  # (T, D)
        cos, sin = rope_cos_sin(positions, self.config.rope, self.config.head_dim)  # (T, H/2) each
        new_pages = []
        for layer, pages in zip(self.layers, kv_pages, strict=True):
            x, pages = layer(x, cos, sin, pages, md)  # (T, D)
            new_pages.append(pages)
        return self.norm(x), new_pages

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """(R, D) hidden states -> (R, V) float32 logits."""
        w = self.embed_tokens if self.lm_head is None else self.lm_head  # (V, D)
        return jnp.einsum("RD,VD->RV", hidden, w[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)  # (R, V)
