"""Tensor parallelism (``jaxpage/sharding.py``): the engine split over 2 and 4 devices gives
the one-device engine's tokens, with the weights and the KV pool really split.

The comparison runs in a subprocess with 8 host CPU devices (XLA_FLAGS must be set before jax
starts); its GPU twin is tests/entrypoints/test_gpu_tensor_parallel.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpage import sharding
from jaxpage.config import ParallelConfig
from tests.entrypoints.engine_util import TINY_LLAMA, tiny_llm
from tests.entrypoints.tp_worker import CHECKPOINT, CONVERTED, GQA, MODELS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tp_runs():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.entrypoints.tp_worker"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    result = json.loads(line[len("RESULT "):])
    assert result["devices"] == 8
    return result["runs"]


@pytest.mark.parametrize("name", list(MODELS) + [CHECKPOINT, CONVERTED])
def test_split_engine_matches_one_device(tp_runs, name):
    one = tp_runs[f"{name}/tp1"]
    assert one["pool_devices"] == 1 and one["split_params"] == 0 and one["placed_at_load"] == 0
    hf = MODELS.get(name, GQA)
    heads = hf.get("num_key_value_heads") or hf.get("num_attention_heads", hf.get("n_head"))
    sizes = [int(k.rsplit("tp", 1)[1]) for k in tp_runs if k.startswith(name + "/")]
    assert len(sizes) >= 2
    for tp in sizes[1:]:
        run = tp_runs[f"{name}/tp{tp}"]
        # float32: the split only reorders the sums of the o / down projections.
        assert run["tokens"] == one["tokens"], f"{name} at tp={tp}"
        for a, b in zip(run["logprobs"] + run["prompt_logprobs"],
                        one["logprobs"] + one["prompt_logprobs"]):
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
        assert run["prompt_logprobs"] and run["pages_back"]
        assert run["pool_devices"] == tp and run["param_devices"] == tp
        assert run["pool_shard_heads"] == heads // tp  # each device holds its kv heads only
        assert run["split_params"] >= 4 * 2  # attention and MLP matrices of both layers
        assert run["preemptions"] > 0  # the pool was tight: preemption ran split too
        # Megatron's traffic and no more: an all-reduce after the o and the down projection
        # of each layer, and the (R, V) logits gathered (never the (V, D) lm_head weight,
        # which XLA chose before gather_logits pinned the split).
        vocab = hf["vocab_size"]
        # Checkpoint tensors and dummy draws alike go straight to their shards (the same
        # dummy weights at every size: the tokens above match).
        assert run["placed_at_load"] >= run["split_params"]
        for ops in run["collectives"]:
            reduces = [shape for op, shape in ops if op == "all-reduce"]
            gathers = [shape for op, shape in ops if op == "all-gather"]
            assert len(reduces) == 2 * 2 and len(ops) == len(reduces) + len(gathers), ops
            assert all(shape[-1] == vocab and shape[0] != vocab for shape in gathers), ops


def test_converted_checkpoint_is_the_safetensors_one(tp_runs):
    """`jaxpage convert`'s orbax checkpoint restores each parameter into its shards (counted by
    the loader's placement calls above) and gives the safetensors checkpoint's tokens at every
    size: the same float32 weights."""
    sizes = [k.split("/")[1] for k in tp_runs if k.startswith(CONVERTED + "/")]
    assert sizes == ["tp1", "tp2", "tp4"]
    for tp in sizes:
        assert tp_runs[f"{CONVERTED}/{tp}"]["tokens"] == tp_runs[f"{CHECKPOINT}/{tp}"]["tokens"]


@pytest.mark.parametrize("name", ["llama_gqa_fp8", "llama_gqa_fp8_scaled"])
def test_split_fp8_pool(tp_runs, name):
    """An fp8 pool split by kv heads: really fp8 and split, and the one-device engine's tokens
    in most sequences (a K/V value computed from sums taken in another order may round the
    other way in fp8 and part a sequence), with logprobs close up to any parting. With
    ``calculate_kv_scales``: each layer's scales, from the first step, match one device's."""
    one, two = tp_runs[f"{name}/tp1"], tp_runs[f"{name}/tp2"]
    if name.endswith("scaled"):
        assert len(one["kv_scales"]) == GQA["num_hidden_layers"]
        assert min(min(s) for s in one["kv_scales"]) > 0
        np.testing.assert_allclose(two["kv_scales"], one["kv_scales"], rtol=1e-3)
    else:
        assert one["kv_scales"] == two["kv_scales"] == []
    assert one["pool_dtype"] == two["pool_dtype"] == "float8_e4m3fn"
    assert two["pool_devices"] == 2 and two["pool_shard_heads"] == GQA["num_key_value_heads"] // 2
    assert two["pages_back"] and two["preemptions"] > 0
    identical = 0
    for a, b, la, lb in zip(one["tokens"], two["tokens"], one["logprobs"], two["logprobs"]):
        if a == b:
            identical += 1
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        assert max((abs(x - y) for x, y in zip(la[:k], lb[:k])), default=0.0) < 0.05
    assert identical >= 0.8 * len(one["tokens"]), f"{identical}/{len(one['tokens'])} identical"


def test_sizes_that_do_not_split_fail_before_the_weights_load():
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide.*num_attention_heads=4"):
        tiny_llm(tensor_parallel_size=3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 but this host has 1 cpu"):
        tiny_llm(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        ParallelConfig(tensor_parallel_size=0)


def test_one_rule_table_for_every_family():
    mesh = sharding.make_mesh(1)
    assert mesh is None  # one device: no mesh, no sharding, the single-device path unchanged
    fake = 2  # the rules need only the split's size
    assert sharding.param_spec("q_proj", (64, 8, 8), fake) == P(None, "model", None)
    assert sharding.param_spec("o_proj", (8, 8, 64), fake) == P("model", None, None)
    assert sharding.param_spec("fc1", (64, 128), fake) == P(None, "model")
    assert sharding.param_spec("down_proj", (128, 64), fake) == P("model", None)
    assert sharding.param_spec("lm_head", (512, 64), fake) == P("model", None)
    assert sharding.param_spec("lm_head", (509, 64), fake) == P()  # odd vocab: whole
    assert sharding.param_spec("embed_tokens", (512, 64), fake) == P()
    with pytest.raises(ValueError, match="expects 3 dims"):
        sharding.param_spec("q_proj", (64, 64), fake)


def test_cli_flag():
    import argparse

    from jaxpage.entrypoints import cli

    p = argparse.ArgumentParser()
    cli._add_engine_args(p)
    args = cli._engine_args(p.parse_args(["-tp", "2"]))
    cfg = args.create_engine_config(platform="cpu", model_max_len=2048)
    assert cfg.parallel_config.tensor_parallel_size == 2
    assert TINY_LLAMA["num_attention_heads"] % 2 == 0
