"""The whole jitted step, Pallas kernels included, lowers for CUDA and TPU from this CPU host
(jax.export), so GPU and TPU readiness is checked on every commit."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxpage import kernels_pallas
from jaxpage.models.loader import load_model
from jaxpage.runner.input_batch import PackedLayout
from jaxpage.runner.model_runner import _forward
from tests.entrypoints.engine_util import TINY_LLAMA

TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
MARKERS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.fixture(scope="module")
def model():
    return load_model(None, load_format="dummy", hf_config=TINY_LLAMA, dtype="bfloat16").model


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("decode_only", [False, True])
def test_step_lowers_for_platform(model, platform, decode_only):
    graphdef, state = nnx.split(model)
    cfg = model.config
    layout = PackedLayout(num_tokens=16, num_reqs=8, pages_per_req=8)
    backend = kernels_pallas.resolve_backend("auto", platform=platform)
    assert backend == {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}[platform]
    leaves, treedef = jax.tree.flatten(state)
    fn = jax.jit(functools.partial(_forward, graphdef=graphdef, state_treedef=treedef, layout=layout,
                                   backend=backend, all_logits=False, decode_only=decode_only),
                 donate_argnums=(1,))
    shape = kernels_pallas.kv_cache_shape(64, 16, cfg.num_key_value_heads, cfg.head_dim)
    kv = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)] * cfg.num_hidden_layers
    abstract_state = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
    exp = jax.export.export(fn, platforms=(platform,), disabled_checks=[TRITON])(
        abstract_state, kv, jax.ShapeDtypeStruct((layout.total,), jnp.int32),
        jax.ShapeDtypeStruct((8,), jnp.int32))
    text = exp.mlir_module()
    assert MARKERS[platform] in text  # the Pallas kernel, not the reference
    assert exp.out_avals[0].shape == (8, cfg.vocab_size)
