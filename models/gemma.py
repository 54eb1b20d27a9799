"""Gemma family: Gemma, Gemma 2, Gemma 3 (text).

What sets them apart from Llama, all read once in ``GemmaConfig.from_hf``:

    all       RMSNorm scales by (1 + weight), in float32; embeddings times sqrt(D); GeGLU MLP
              (tanh gelu); tied input / output embeddings; head_dim 256 on most sizes
    Gemma 2   norms after attention and around the MLP too (four per layer); attention scores
              scaled by query_pre_attn_scalar^-1/2 and capped by tanh (attn_logit_softcapping);
              final logits capped likewise (final_logit_softcapping); sliding-window attention
              on alternate layers (``layer_types``)
    Gemma 3   Gemma 2's four norms and scaling; RMSNorm on each q and k head before rope; no
              caps; five sliding layers to one global, the sliding ones with their own rope
              base (``rope_local_base_freq``, or ``rope_parameters["sliding_attention"]``)

Letters in einsums and shape comments follow ``models/GLOSSARY.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpage.models.attention import AttentionMetadata
from jaxpage.models.layers import RopeConfig, rope_cos_sin, zeros
from jaxpage.models.llama import (LlamaAttention, LlamaConfig, LlamaForCausalLM, LlamaMLP,
                                  hf_dims, hf_layer_types)

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class GemmaConfig(LlamaConfig):
    """Llama's config (whose attention and MLP Gemma reuses) plus Gemma's own fields. Build it
    from an HF ``config.json`` dict with ``from_hf``."""

    hidden_act: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    local_rope: RopeConfig | None = None  # Gemma 3: the sliding layers' rotary embedding
    sandwich_norms: bool = False  # Gemma 2 / 3: post-attention, pre- and post-MLP norms
    query_pre_attn_scalar: float | None = None  # None: scores scaled by head_dim^-1/2
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "GemmaConfig":
        model_type = hf.get("model_type", "gemma")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"Unsupported Gemma model_type {model_type!r}; supported: "
                             f"{', '.join(MODEL_TYPES)}.")
        num_layers = int(hf["num_hidden_layers"])
        later = model_type != "gemma"
        window = hf.get("sliding_window")
        if later and window:
            # Default layouts as transformers writes them when a config omits ``layer_types``:
            # Gemma 2 slides on even layers, Gemma 3 on all but every sixth.
            every = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
            types = hf_layer_types(hf, [
                "sliding_attention" if (i + 1) % every else "full_attention"
                for i in range(num_layers)])
            windows = tuple(int(window) if t == "sliding_attention" else None for t in types)
        else:
            windows = (None,) * num_layers
        rope, local_rope = _rope_configs(hf, model_type)
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        scalar = hf.get("query_pre_attn_scalar") if later else None
        return cls(
            **hf_dims(hf, default_max_positions=8192),
            rope=rope, local_rope=local_rope,
            # Gemma 1 configs say "gelu" but mean the tanh form (as transformers remaps it).
            hidden_act="gelu_pytorch_tanh" if act == "gelu" else act,
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            sandwich_norms=later, qk_norm=model_type == "gemma3_text",
            query_pre_attn_scalar=None if scalar is None else float(scalar),
            attn_logit_softcapping=_cap(hf.get("attn_logit_softcapping")) if later else None,
            final_logit_softcapping=_cap(hf.get("final_logit_softcapping")) if later else None,
            sliding_windows=windows,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )


def _cap(value) -> float | None:
    return None if value is None else float(value)


def _rope_configs(hf: dict[str, Any], model_type: str) -> tuple[RopeConfig, RopeConfig | None]:
    """(global rope, sliding layers' rope or None). transformers v5 writes Gemma 3's as
    ``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``; v4 as
    ``rope_theta`` + ``rope_scaling`` and ``rope_local_base_freq``."""
    params = hf.get("rope_parameters") or {}
    if model_type != "gemma3_text":
        return RopeConfig.from_hf(hf), None
    if "full_attention" in params:
        flat = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling")}
        full = RopeConfig.from_hf(dict(flat, rope_parameters=params["full_attention"]))
        local = RopeConfig.from_hf(dict(flat, rope_parameters=params.get(
            "sliding_attention", {"rope_type": "default", "rope_theta": 10000.0})))
        return full, local
    local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    return (RopeConfig.from_hf(dict(hf, rope_theta=hf.get("rope_theta", 1_000_000.0))),
            RopeConfig(theta=local_theta))


class GemmaRMSNorm(nnx.Module):
    """x / rms(x) * (1 + weight), all in float32, then cast (as transformers' Gemma norms)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.weight = zeros((dim,), param_dtype)  # a stored 0 is a scale of 1

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # (..., dim)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)  # (..., 1)
        y = x32 * jax.lax.rsqrt(var + self.eps) * (1.0 + self.weight[...].astype(jnp.float32))
        return y.astype(self.dtype)


class GemmaDecoderLayer(nnx.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        D = cfg.hidden_size
        self.sliding = bool(cfg.sliding_windows and cfg.sliding_windows[layer_idx])
        self.input_layernorm = GemmaRMSNorm(D, **norm)
        self.self_attn = LlamaAttention(
            cfg, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            norm_cls=GemmaRMSNorm, sm_scale=float(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5,
            soft_cap=cfg.attn_logit_softcapping)
        self.post_attention_layernorm = GemmaRMSNorm(D, **norm)
        sandwich = cfg.sandwich_norms
        self.pre_feedforward_layernorm = GemmaRMSNorm(D, **norm) if sandwich else None
        self.post_feedforward_layernorm = GemmaRMSNorm(D, **norm) if sandwich else None
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, kv_pages, md):
        attn, kv_pages = self.self_attn(self.input_layernorm(x), cos, sin, kv_pages, md)  # (T, D)
        if self.pre_feedforward_layernorm is None:  # Gemma: Llama's two norms
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x)), kv_pages  # (T, D)
        x = x + self.post_attention_layernorm(attn)
        h = self.mlp(self.pre_feedforward_layernorm(x))  # (T, D)
        return x + self.post_feedforward_layernorm(h), kv_pages


class GemmaForCausalLM(LlamaForCausalLM):
    """Decoder-only Gemma over the paged KV pool; see the module docstring for variants."""

    layer_cls = GemmaDecoderLayer
    norm_cls = GemmaRMSNorm

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_pages: list[jax.Array],
                 md: AttentionMetadata) -> tuple[jax.Array, list[jax.Array]]:
        """Runs one ragged step: (T,) ids and positions -> ((T, D) normed hidden, pools)."""
        cfg = self.config
        emb = jnp.take(self.embed_tokens[...], input_ids, axis=0)  # (T, D)
        # sqrt(D) rounded to the weights' dtype first, as transformers does.
        x = (emb * jnp.asarray(cfg.hidden_size ** 0.5, emb.dtype)).astype(self.dtype)  # (T, D)
        cos, sin = rope_cos_sin(positions, cfg.rope, cfg.head_dim)  # (T, H/2) each
        local = (rope_cos_sin(positions, cfg.local_rope, cfg.head_dim)
                 if cfg.local_rope is not None else (cos, sin))
        new_pages = []
        for layer, pages in zip(self.layers, kv_pages, strict=True):
            c, s = local if layer.sliding else (cos, sin)
            x, pages = layer(x, c, s, pages, md)  # (T, D)
            new_pages.append(pages)
        return self.norm(x), new_pages

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """(R, D) hidden states -> (R, V) float32 logits (tanh-capped on Gemma 2)."""
        logits = super().compute_logits(hidden)  # (R, V)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)
