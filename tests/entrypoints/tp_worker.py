"""Runs in its own process with several host CPU devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=8``, which must be set before jax starts): the engine
at tensor_parallel_size 1, 2 and 4 on the same random weights. Prints one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.entrypoints.tp_worker
"""

from __future__ import annotations

import json
import re
import sys

import jax
import numpy as np

from jaxpage import SamplingParams
from tests.entrypoints.engine_util import TINY_LLAMA, random_prompts, tiny_llm

# N = 8, K = 4 (GQA 2): splits over 2 and 4 devices; vocab 512 splits the untied lm_head.
GQA = dict(TINY_LLAMA, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
           intermediate_size=128)
MODELS = {
    "llama_gqa": GQA,
    "llama_tied_odd_vocab": dict(GQA, tie_word_embeddings=True, vocab_size=509),
    "qwen2_bias": dict(GQA, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "opt": dict(architectures=["OPTForCausalLM"], model_type="opt", vocab_size=512,
                hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, do_layer_norm_before=True),
    "gpt2": dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=512,
                 n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128,
                 bos_token_id=1, eos_token_id=2),
}


def run(name: str, hf: dict, tp: int, prompts, params):
    llm = tiny_llm(hf_config=hf, tensor_parallel_size=tp, num_pages=40, max_num_seqs=6,
                   max_model_len=128)
    engine = llm.engine
    baseline = engine.num_free_pages
    outs = llm.generate(prompts, params, use_tqdm=False)
    runner = engine.model_runner
    pool = runner.kv_pages[0]
    info = dict(
        tokens=[o.outputs[0].token_ids for o in outs],
        logprobs=[[lp.logprobs[0] for lp in o.outputs[0].logprobs] for o in outs],  # chosen
        prompt_logprobs=[[lp.logprobs[0] for lp in o.prompt_logprobs[1:]]
                         for o in outs if o.prompt_logprobs],
        pages_back=engine.num_free_pages == baseline,
        pool_devices=len(pool.sharding.device_set),
        pool_shard_heads=int(pool.addressable_shards[0].data.shape[2]),
        param_devices=max(len(p.sharding.device_set) for p in runner.params),
        split_params=sum(p.addressable_shards[0].data.shape != p.shape for p in runner.params),
        preemptions=engine.scheduler.num_preemptions,
        collectives=[collectives(exe.as_text()) for exe in runner._compiled.values()],
    )
    return info


def collectives(hlo: str) -> list[tuple[str, list[int]]]:
    """(op, result shape) of every collective in a compiled step's optimized HLO."""
    found = re.findall(r"= \w+\[([\d,]*)\]\S* (all-reduce|all-gather|reduce-scatter|all-to-all|"
                       r"collective-permute)(?:-start)?\(", hlo)
    return [(op, [int(d) for d in dims.split(",") if d]) for dims, op in found]


def main() -> None:
    names = sys.argv[1:] or list(MODELS)
    result = dict(devices=len(jax.devices()), runs={})
    for name in names:
        hf = MODELS[name]
        # A shared prefix (prefix caching), long prompts over a 40-page pool (chunked prefill and
        # preemption), greedy and seeded sampling.
        prompts = random_prompts(10, 500, 3, 60, seed=5, shared_prefix=12)
        params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, top_p=0.95,
                                 max_tokens=24, ignore_eos=True, logprobs=2,
                                 prompt_logprobs=1 if i == 3 else None)
                  for i in range(len(prompts))]
        for tp in (1, 2, 4):
            if name in ("opt", "gpt2") and tp == 4:
                continue  # 4 heads: 4-way works too, but two sizes are enough for these families
            result["runs"][f"{name}/tp{tp}"] = run(name, hf, tp, prompts, params)
    print("RESULT " + json.dumps(result, default=lambda x: np.asarray(x).tolist()))


if __name__ == "__main__":
    main()
