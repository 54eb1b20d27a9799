"""Tensor parallelism: the device mesh and where each parameter and KV pool lives on it.

One ``Mesh`` with axes ("data", "model"); tensor parallelism splits the "model" axis in the
Megatron way, so that each layer costs two all-reduces and model code calls no collective:

    q/k/v projections    split over heads         (D, N|K, H) -> P(None, "model", None)
    o projection         split over heads         (N, H, D)   -> P("model", None, None)
    MLP up / gate        split over F             (D, F)      -> P(None, "model")
    MLP down             split over F             (F, D)      -> P("model", None)
    lm_head              split over the vocab     (V, D)      -> P("model", None)
    KV pool              split over kv heads      (see kernels_pallas.kv_cache_head_axis)
    everything else      replicated (embeddings, norms, biases of D)

XLA propagates these through the einsums and inserts the all-reduces after the o and down
projections; attention runs per device under ``shard_map`` (``models/attention.py``), each
device on its own heads and its own slice of every page.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODEL_AXIS = "model"
DATA_AXIS = "data"

# Parameter name (the module attribute) -> how its dimensions split. One table for every
# family in models/: Llama (q/k/v/o_proj, gate/up/down_proj), OPT (out_proj, fc1, fc2),
# GPT-2 (o_proj, fc, proj).
_RULES: dict[str, tuple[str | None, ...]] = {
    **{name: (None, MODEL_AXIS, None) for name in ("q_proj", "k_proj", "v_proj")},
    **{name: (MODEL_AXIS, None, None) for name in ("o_proj", "out_proj")},
    **{name: (MODEL_AXIS, None) for name in ("q_bias", "k_bias", "v_bias")},
    **{name: (None, MODEL_AXIS) for name in ("gate_proj", "up_proj", "fc1", "fc")},
    **{name: (MODEL_AXIS,) for name in ("gate_bias", "up_bias", "fc1_bias", "fc_bias")},
    **{name: (MODEL_AXIS, None) for name in ("down_proj", "fc2", "proj")},
}
# Split where the dimension divides, replicated otherwise (a vocabulary need not divide).
_OPTIONAL_RULES: dict[str, tuple[str | None, ...]] = {"lm_head": (MODEL_AXIS, None)}


def make_mesh(tensor_parallel_size: int) -> Mesh | None:
    """The ("data", "model") mesh over the first ``tensor_parallel_size`` devices; None for 1
    (the single-device path carries no sharding at all).

    Raises:
        ValueError: fewer devices than asked for.
    """
    if tensor_parallel_size == 1:
        return None
    devices = jax.devices()
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} but this host has "
                         f"{len(devices)} {jax.default_backend()} device(s).")
    grid = np.asarray(devices[:tensor_parallel_size]).reshape(1, tensor_parallel_size)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def check_tensor_parallel(config: Any, tensor_parallel_size: int) -> None:
    """Checks before any weight loads that the model splits evenly over the devices.

    Raises:
        ValueError: a head count or the MLP width that ``tensor_parallel_size`` does not divide.
    """
    tp = tensor_parallel_size
    if tp == 1:
        return
    sizes = {"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads",
                                            config.num_attention_heads),
             "intermediate_size": getattr(config, "intermediate_size", None)
             or getattr(config, "ffn_dim", None)}
    bad = [f"{name}={size}" for name, size in sizes.items() if size is not None and size % tp]
    if bad:
        raise ValueError(f"tensor_parallel_size={tp} must divide the model's {', '.join(bad)} "
                         "(heads and the MLP split evenly across devices).")


def param_spec(name: str, shape: tuple[int, ...], tensor_parallel_size: int) -> P:
    """The PartitionSpec of the parameter called ``name`` (its module attribute)."""
    axes = _RULES.get(name)
    if axes is None:
        axes = _OPTIONAL_RULES.get(name)
        if axes is None or any(a and d % tensor_parallel_size for a, d in zip(axes, shape)):
            return P()
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name!r} has shape {shape}; the sharding rule expects "
                         f"{len(axes)} dims.")
    return P(*axes)


def param_sharding(mesh: Mesh):
    """``(parameter name, shape) -> NamedSharding`` on ``mesh`` (the loader's ``placement``)."""
    return lambda name, shape: NamedSharding(mesh, param_spec(name, shape,
                                                              mesh.shape[MODEL_AXIS]))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves every parameter to its sharding on ``mesh`` (each device receives its slice;
    a no-op for parameters the loader already placed there)."""
    place = param_sharding(mesh)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        value = var.get_value()
        var.set_value(jax.device_put(value, place(str(path[-1]), tuple(value.shape))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def kv_pool_spec(ndim: int, head_axis: int) -> P:
    """One layer's KV pool, split over its kv-head axis."""
    axes: list[str | None] = [None] * ndim
    axes[head_axis] = MODEL_AXIS
    return P(*axes)


def kv_pool_sharding(mesh: Mesh, ndim: int, head_axis: int) -> NamedSharding:
    return NamedSharding(mesh, kv_pool_spec(ndim, head_axis))


def gather_logits(logits: jax.Array, *, mesh: Mesh) -> jax.Array:
    """(R, V) logits of a vocab-split lm_head, made whole on every device.

    Pinned vocab-split first: left to itself, XLA gathered the (V, D) lm_head weight onto
    every device instead (an all-gather of 1 GiB per step for Llama-3-8B) to gather R rows.
    """
    if logits.shape[-1] % mesh.shape[MODEL_AXIS] == 0:  # else lm_head stays whole (param_spec)
        logits = jax.lax.with_sharding_constraint(logits,
                                                  NamedSharding(mesh, P(None, MODEL_AXIS)))
    return jax.lax.with_sharding_constraint(logits, replicated(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
