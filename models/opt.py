"""OPT (facebook/opt-125m ... opt-66b), as HF's ``OPTForCausalLM`` computes it.

Quirks kept from the original:
  * learned positions with an offset of 2: position p reads row p + 2 of ``embed_positions``;
  * ``do_layer_norm_before`` (pre-LN, most sizes) vs post-LN (opt-350m);
  * opt-350m also embeds in E = ``word_embed_proj_dim`` != D, with ``project_in`` / ``project_out``;
  * the query is scaled by H^-0.5 right after its projection (so attention runs with scale 1).

Letters in einsums and shape comments follow ``models/GLOSSARY.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpage.models.attention import AttentionMetadata, paged_attention
from jaxpage.models.layers import LayerNorm, get_activation, param, zeros

POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool = True
    has_final_layer_norm: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "OPTConfig":
        pre_ln = bool(hf.get("do_layer_norm_before", True))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            ffn_dim=int(hf["ffn_dim"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            word_embed_proj_dim=int(hf.get("word_embed_proj_dim") or hf["hidden_size"]),
            do_layer_norm_before=pre_ln,
            has_final_layer_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
            enable_bias=bool(hf.get("enable_bias", True)),
            layer_norm_elementwise_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
            activation_function=hf.get("activation_function", "relu"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            initializer_range=float(hf.get("init_std", 0.02)),
        )


class OPTDecoderLayer(nnx.Module):
    def __init__(self, cfg: OPTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, N, H, F = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.ffn_dim
        std, bias = cfg.initializer_range, cfg.enable_bias
        self.cfg = cfg
        self.dtype = dtype
        self.q_proj = param(rngs, (D, N, H), param_dtype, std)
        self.k_proj = param(rngs, (D, N, H), param_dtype, std)
        self.v_proj = param(rngs, (D, N, H), param_dtype, std)
        self.out_proj = param(rngs, (N, H, D), param_dtype, std)
        self.q_bias = zeros((N, H), param_dtype) if bias else None
        self.k_bias = zeros((N, H), param_dtype) if bias else None
        self.v_bias = zeros((N, H), param_dtype) if bias else None
        self.out_bias = zeros((D,), param_dtype) if bias else None
        self.fc1 = param(rngs, (D, F), param_dtype, std)
        self.fc2 = param(rngs, (F, D), param_dtype, std)
        self.fc1_bias = zeros((F,), param_dtype) if bias else None
        self.fc2_bias = zeros((D,), param_dtype) if bias else None
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                    use_affine=cfg.layer_norm_elementwise_affine)
        self.self_attn_layer_norm = LayerNorm(D, **norm)
        self.final_layer_norm = LayerNorm(D, **norm)

    def _bias(self, y: jax.Array, b: nnx.Param | None) -> jax.Array:
        return y if b is None else y + b[...].astype(self.dtype)

    def attention(self, x: jax.Array, kv_pages: jax.Array, md: AttentionMetadata):
        dt, H = self.dtype, self.cfg.head_dim
        q = jnp.einsum("TD,DNH->TNH", x, self.q_proj[...].astype(dt))  # (T, N, H)
        k = jnp.einsum("TD,DKH->TKH", x, self.k_proj[...].astype(dt))  # (T, K, H)
        v = jnp.einsum("TD,DKH->TKH", x, self.v_proj[...].astype(dt))  # (T, K, H)
        q, k, v = self._bias(q, self.q_bias), self._bias(k, self.k_bias), self._bias(v, self.v_bias)
        q = q * (H ** -0.5)  # HF scales q before attention, then attends with scale 1
        out, kv_pages = paged_attention(q, k, v, kv_pages, md, sm_scale=1.0)  # (T, N, H)
        y = jnp.einsum("TNH,NHD->TD", out, self.out_proj[...].astype(dt))  # (T, D)
        return self._bias(y, self.out_bias), kv_pages

    def mlp(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        h = self._bias(jnp.einsum("TD,DF->TF", x, self.fc1[...].astype(dt)), self.fc1_bias)  # (T, F)
        h = get_activation(self.cfg.activation_function)(h)
        y = jnp.einsum("TF,FD->TD", h, self.fc2[...].astype(dt))  # (T, D)
        return self._bias(y, self.fc2_bias)

    def __call__(self, x: jax.Array, kv_pages: jax.Array, md: AttentionMetadata):
        pre_ln = self.cfg.do_layer_norm_before
        attn, kv_pages = self.attention(self.self_attn_layer_norm(x) if pre_ln else x, kv_pages, md)
        x = x + attn  # (T, D)
        if not pre_ln:
            x = self.self_attn_layer_norm(x)
        x = x + self.mlp(self.final_layer_norm(x) if pre_ln else x)  # (T, D)
        if not pre_ln:
            x = self.final_layer_norm(x)
        return x, kv_pages


class OPTForCausalLM(nnx.Module):
    def __init__(self, config: OPTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        cfg = config
        D, E, V, std = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.vocab_size, cfg.initializer_range
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = param(rngs, (V, E), param_dtype, std)  # (V, E)
        self.embed_positions = param(
            rngs, (cfg.max_position_embeddings + POSITION_OFFSET, D), param_dtype, std)  # (X + 2, D)
        self.project_in = param(rngs, (E, D), param_dtype, std) if E != D else None
        self.project_out = param(rngs, (D, E), param_dtype, std) if E != D else None
        self.layers = nnx.List([OPTDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = LayerNorm(
            D, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
            use_affine=cfg.layer_norm_elementwise_affine) if cfg.has_final_layer_norm else None
        self.lm_head = None if cfg.tie_word_embeddings else param(rngs, (V, E), param_dtype, std)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_pages: list[jax.Array],
                 md: AttentionMetadata) -> tuple[jax.Array, list[jax.Array]]:
        """One ragged step, as ``LlamaForCausalLM.__call__``; returns (T, D) hidden states."""
        dt = self.dtype
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dt)  # (T, E)
        if self.project_in is not None:
            x = jnp.einsum("TE,ED->TD", x, self.project_in[...].astype(dt))  # (T, D)
        pos = jnp.take(self.embed_positions[...], positions + POSITION_OFFSET, axis=0)  # (T, D)
        x = x + pos.astype(dt)
        new_pages = []
        for layer, pages in zip(self.layers, kv_pages, strict=True):
            x, pages = layer(x, pages, md)  # (T, D)
            new_pages.append(pages)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x, new_pages

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """(R, D) hidden states -> (R, V) float32 logits (``project_out`` applied here)."""
        dt = self.dtype
        if self.project_out is not None:
            hidden = jnp.einsum("RD,DE->RE", hidden, self.project_out[...].astype(dt))  # (R, E)
        w = self.embed_tokens if self.lm_head is None else self.lm_head  # (V, E)
        return jnp.einsum("RE,VE->RV", hidden, w[...].astype(dt),
                          preferred_element_type=jnp.float32)  # (R, V)
