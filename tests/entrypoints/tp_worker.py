"""Runs in its own process with several host CPU devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=8``, which must be set before jax starts): the engine
at tensor_parallel_size 1, 2 and 4 on the same random weights. Prints one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.entrypoints.tp_worker
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxpage import SamplingParams
from tests.entrypoints.engine_util import TINY_LLAMA, random_prompts, tiny_llm

# N = 8, K = 4 (GQA 2): splits over 2 and 4 devices; vocab 512 splits the untied lm_head.
GQA = dict(TINY_LLAMA, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
           intermediate_size=128)
CHECKPOINT = "llama_safetensors"  # GQA's shape, saved by transformers and loaded from disk
CONVERTED = "llama_converted"  # the same checkpoint through `jaxpage convert` (orbax), float32
MODELS = {
    "llama_gqa": GQA,
    "llama_tied_odd_vocab": dict(GQA, tie_word_embeddings=True, vocab_size=509),
    "qwen2_bias": dict(GQA, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    # Gemma 2: sandwich norms, tanh-capped scores (inside the split attention) and logits,
    # a sliding first layer.
    "gemma2": dict(GQA, architectures=["Gemma2ForCausalLM"], model_type="gemma2",
                   query_pre_attn_scalar=8, attn_logit_softcapping=1.0,
                   final_logit_softcapping=5.0, sliding_window=16, tie_word_embeddings=True),
    "opt": dict(architectures=["OPTForCausalLM"], model_type="opt", vocab_size=512,
                hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, do_layer_norm_before=True),
    "gpt2": dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=512,
                 n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128,
                 bos_token_id=1, eos_token_id=2),
}


# Engine arguments beside the model: an fp8 pool split by kv heads (its own test: quantizing
# K/V computed from differently ordered sums may round a value the other way).
ENGINE_KW = {"llama_gqa_fp8": dict(kv_cache_dtype="fp8"),
             # per-layer K/V scales, computed on the first step (replicated beside the split pool)
             "llama_gqa_fp8_scaled": dict(kv_cache_dtype="fp8", calculate_kv_scales=True)}


def run(name: str, hf: dict, tp: int, prompts, params, path=None):
    source = dict(hf_config=hf) if path is None else dict(model=str(path), load_format="auto",
                                                          hf_config=None)
    llm = tiny_llm(**source, tensor_parallel_size=tp, num_pages=40, max_num_seqs=6,
                   max_model_len=128, **ENGINE_KW.get(name, {}))
    engine = llm.engine
    baseline = engine.num_free_pages
    outs = llm.generate(prompts, params, use_tqdm=False)
    runner = engine.model_runner
    pool = getattr(runner.kv_pages[0], "pages", runner.kv_pages[0])  # a ScaledKVPool's pages
    info = dict(
        kv_scales=[np.asarray(p.scales).tolist() for p in runner.kv_pages
                   if hasattr(p, "scales")],
        tokens=[o.outputs[0].token_ids for o in outs],
        logprobs=[[lp.logprobs[0] for lp in o.outputs[0].logprobs] for o in outs],  # chosen
        prompt_logprobs=[[lp.logprobs[0] for lp in o.prompt_logprobs[1:]]
                         for o in outs if o.prompt_logprobs],
        pages_back=engine.num_free_pages == baseline,
        pool_devices=len(pool.sharding.device_set),
        pool_shard_heads=int(pool.addressable_shards[0].data.shape[2]),
        pool_dtype=str(pool.dtype),
        param_devices=max(len(p.sharding.device_set) for p in runner.params),
        split_params=sum(p.addressable_shards[0].data.shape != p.shape for p in runner.params),
        preemptions=engine.scheduler.num_preemptions,
        collectives=[collectives(exe.as_text()) for exe in runner._compiled.values()],
        placed_at_load=len(PLACED),  # tensors the loader sent (or drew) straight into shards
    )
    PLACED.clear()
    return info


def collectives(hlo: str) -> list[tuple[str, list[int]]]:
    """(op, result shape) of every collective in a compiled step's optimized HLO."""
    found = re.findall(r"= \w+\[([\d,]*)\]\S* (all-reduce|all-gather|reduce-scatter|all-to-all|"
                       r"collective-permute)(?:-start)?\(", hlo)
    return [(op, [int(d) for d in dims.split(",") if d]) for dims, op in found]


PLACED: list[str] = []


def _count_placements() -> None:
    """Counts the loader's calls for a tensor's sharding (the runner's ``shard_model``, a
    no-op then, goes through ``sharding.param_sharding`` directly, uncounted)."""
    import jaxpage.entrypoints.engine_builder as builder

    orig = builder.param_sharding

    def counted(mesh):
        place = orig(mesh)
        return lambda name, shape: (PLACED.append(name), place(name, shape))[1]

    builder.param_sharding = counted


def save_checkpoint(hf: dict, path: Path) -> None:
    """A random HF Llama checkpoint (safetensors) of the ``hf`` shape."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def main() -> None:
    names = sys.argv[1:] or list(MODELS) + [CHECKPOINT, CONVERTED] + list(ENGINE_KW)
    result = dict(devices=len(jax.devices()), runs={})
    _count_placements()
    tmp = tempfile.TemporaryDirectory()
    for name in names:
        hf = MODELS.get(name, GQA)
        path = None
        if name in (CHECKPOINT, CONVERTED):
            path = Path(tmp.name) / CHECKPOINT
            if not path.exists():
                save_checkpoint(hf, path)
        if name == CONVERTED:
            from jaxpage.models.checkpoint import convert
            path = convert(path, Path(tmp.name) / name, dtype="float32")
        # A shared prefix (prefix caching), long prompts over a 40-page pool (chunked prefill and
        # preemption), greedy and seeded sampling.
        prompts = random_prompts(10, 500, 3, 60, seed=5, shared_prefix=12)
        params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, top_p=0.95,
                                 max_tokens=24, ignore_eos=True, logprobs=2,
                                 prompt_logprobs=1 if i == 3 else None)
                  for i in range(len(prompts))]
        for tp in (1, 2, 4):
            if name in ("opt", "gpt2", *ENGINE_KW) and tp == 4:
                continue  # 4-way works too, but two sizes are enough for these
            result["runs"][f"{name}/tp{tp}"] = run(name, hf, tp, prompts, params, path)
    print("RESULT " + json.dumps(result, default=lambda x: np.asarray(x).tolist()))


if __name__ == "__main__":
    main()
