"""GPT-2 (gpt2 ... gpt2-xl, distilgpt2), as HF's ``GPT2LMHeadModel`` computes it.

Pre-LN blocks, learned absolute positions (no offset), a fused ``c_attn`` in the checkpoint that
the loader splits into q/k/v, tied output embedding. Letters follow ``models/GLOSSARY.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpage.models.attention import AttentionMetadata, paged_attention
from jaxpage.models.layers import LayerNorm, get_activation, param, zeros


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "GPT2Config":
        D = int(hf.get("n_embd", hf.get("hidden_size", 768)))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=D,
            intermediate_size=int(hf.get("n_inner") or 4 * D),
            num_hidden_layers=int(hf.get("n_layer", hf.get("num_hidden_layers", 12))),
            num_attention_heads=int(hf.get("n_head", hf.get("num_attention_heads", 12))),
            max_position_embeddings=int(hf.get("n_positions",
                                               hf.get("max_position_embeddings", 1024))),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            activation_function=hf.get("activation_function", "gelu_new"),
            scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, N, H, F = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
        std = cfg.initializer_range
        self.cfg = cfg
        self.dtype = dtype
        scale = H ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.sm_scale = scale
        norm = dict(eps=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(D, **norm)
        self.q_proj = param(rngs, (D, N, H), param_dtype, std)
        self.k_proj = param(rngs, (D, N, H), param_dtype, std)
        self.v_proj = param(rngs, (D, N, H), param_dtype, std)
        self.o_proj = param(rngs, (N, H, D), param_dtype, std)
        self.q_bias = zeros((N, H), param_dtype)
        self.k_bias = zeros((N, H), param_dtype)
        self.v_bias = zeros((N, H), param_dtype)
        self.o_bias = zeros((D,), param_dtype)
        self.ln_2 = LayerNorm(D, **norm)
        self.fc = param(rngs, (D, F), param_dtype, std)
        self.fc_bias = zeros((F,), param_dtype)
        self.proj = param(rngs, (F, D), param_dtype, std)
        self.proj_bias = zeros((D,), param_dtype)

    def attention(self, x: jax.Array, kv_pages: jax.Array, md: AttentionMetadata):
        dt = self.dtype
        q = jnp.einsum("TD,DNH->TNH", x, self.q_proj[...].astype(dt))  # (T, N, H)
        k = jnp.einsum("TD,DKH->TKH", x, self.k_proj[...].astype(dt))  # (T, K, H)
        v = jnp.einsum("TD,DKH->TKH", x, self.v_proj[...].astype(dt))  # (T, K, H)
        q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                   v + self.v_bias[...].astype(dt))
        out, kv_pages = paged_attention(q, k, v, kv_pages, md, sm_scale=self.sm_scale)  # (T, N, H)
        y = jnp.einsum("TNH,NHD->TD", out, self.o_proj[...].astype(dt))  # (T, D)
        return y + self.o_bias[...].astype(dt), kv_pages

    def mlp(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        h = jnp.einsum("TD,DF->TF", x, self.fc[...].astype(dt))  # (T, F)
        h = get_activation(self.cfg.activation_function)(h + self.fc_bias[...].astype(dt))
        y = jnp.einsum("TF,FD->TD", h, self.proj[...].astype(dt))  # (T, D)
        return y + self.proj_bias[...].astype(dt)

    def __call__(self, x: jax.Array, kv_pages: jax.Array, md: AttentionMetadata):
        attn, kv_pages = self.attention(self.ln_1(x), kv_pages, md)
        x = x + attn  # (T, D)
        x = x + self.mlp(self.ln_2(x))  # (T, D)
        return x, kv_pages


class GPT2LMHeadModel(nnx.Module):
    def __init__(self, config: GPT2Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        cfg = config
        D, V, std = cfg.hidden_size, cfg.vocab_size, cfg.initializer_range
        self.config = cfg
        self.dtype = dtype
        self.wte = param(rngs, (V, D), param_dtype, std)  # (V, D)
        self.wpe = param(rngs, (cfg.max_position_embeddings, D), param_dtype, std)  # (X, D)
        self.layers = nnx.List([GPT2Block(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.ln_f = LayerNorm(D, eps=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else param(rngs, (V, D), param_dtype, std)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_pages: list[jax.Array],
                 md: AttentionMetadata) -> tuple[jax.Array, list[jax.Array]]:
        """One ragged step, as ``LlamaForCausalLM.__call__``; returns (T, D) hidden states."""
        x = jnp.take(self.wte[...], input_ids, axis=0) + jnp.take(self.wpe[...], positions, axis=0)
        x = x.astype(self.dtype)  # (T, D)
        new_pages = []
        for layer, pages in zip(self.layers, kv_pages, strict=True):
            x, pages = layer(x, pages, md)  # (T, D)
            new_pages.append(pages)
        return self.ln_f(x), new_pages

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """(R, D) hidden states -> (R, V) float32 logits."""
        w = self.wte if self.lm_head is None else self.lm_head  # (V, D)
        return jnp.einsum("RD,VD->RV", hidden, w[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)  # (R, V)
