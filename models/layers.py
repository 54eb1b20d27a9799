"""Building blocks shared by the model families: norms, rotary embedding, activations.

Letters in shape comments follow ``models/GLOSSARY.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation named like HF's ``ACT2FN``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


# Each parameter remembers how it was drawn (``dummy_init``), so that the loader can draw
# dummy weights again straight into their tensor-parallel shards (``loader._dummy_weights``).
def param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float) -> nnx.Param:
    """A normal(0, std) parameter created directly in ``dtype`` (fast dummy weights on device)."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype),
                     dummy_init=("normal", std))


def zeros(shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), dummy_init=("zeros",))


def ones(shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), dummy_init=("ones",))


class RMSNorm(nnx.Module):
    """Llama-style RMSNorm: normalize in float32, cast back, then scale (as HF does)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.weight = ones((dim,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # (..., dim)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)  # (..., 1)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)  # (..., dim)
        return (self.weight[...].astype(self.dtype) * y).astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm, computed in float32; ``use_affine=False`` has no parameters."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, use_affine: bool = True):
        self.eps = eps
        self.dtype = dtype
        self.weight = ones((dim,), param_dtype) if use_affine else None
        self.bias = zeros((dim,), param_dtype) if use_affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # (..., dim)
        mean = jnp.mean(x32, axis=-1, keepdims=True)  # (..., 1)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # (..., 1)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)  # (..., dim)
        if self.weight is not None:
            y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (hashable: it sits in a static model config).

    ``freq_divisors`` are per-frequency divisors of the inverse frequencies as GGUF files store
    them (llama.cpp's ``rope_freqs`` tensor); they replace ``rope_type`` scaling when set.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_divisors: tuple[float, ...] | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "RopeConfig":
        """Reads transformers v5 ``rope_parameters`` or v4 ``rope_theta`` + ``rope_scaling``."""
        params = dict(hf.get("rope_scaling") or {})
        params.update(hf.get("rope_parameters") or {})
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"Unsupported rope type {rope_type!r}; supported: {list(ROPE_TYPES)}.")
        if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported.")
        return cls(
            theta=float(theta), rope_type=rope_type, factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))))


@functools.lru_cache(maxsize=64)
def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """(H/2,) float32 inverse frequencies, computed as transformers computes them (float32)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)  # (H/2,)
    if rope.freq_divisors is not None:
        return (inv_freq / np.asarray(rope.freq_divisors, np.float32)).astype(np.float32)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_len / rope.low_freq_factor
        high_freq_wavelen = old_len / rope.high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions: jax.Array, rope: RopeConfig, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (T, H/2) in float32 for the given absolute positions (T,)."""
    inv_freq = jnp.asarray(rope_inv_freq(rope, head_dim))  # (H/2,)
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, H/2)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates (T, heads, H) by half-split pairs (HF's ``rotate_half`` convention)."""
    half = x.shape[-1] // 2
    cos = cos.astype(x.dtype)[:, None, :]  # (T, 1, H/2)
    sin = sin.astype(x.dtype)[:, None, :]  # (T, 1, H/2)
    x1, x2 = x[..., :half], x[..., half:]  # (T, heads, H/2) each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (T, heads, H)
