"""Shared pieces of the engine-level tests: a tiny random model and vLLM's closeness rule."""

from __future__ import annotations

import numpy as np

from jaxpage import LLM, SamplingParams

TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def tiny_llm(**kwargs) -> LLM:
    defaults = dict(model=None, load_format="dummy", hf_config=TINY_LLAMA, dtype="float32",
                    seed=0, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    defaults.update(kwargs)
    return LLM(**defaults)


def random_prompts(num: int, vocab: int, lo: int, hi: int, seed: int = 0,
                   shared_prefix: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, vocab, shared_prefix).tolist()
    out = []
    for i in range(num):
        body = rng.integers(3, vocab, int(rng.integers(lo, hi + 1))).tolist()
        out.append(prefix + body if i % 2 == 0 else body)
    return out


def greedy(max_tokens: int, logprobs: int | None = 5) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=logprobs)


def assert_close(ref, other, *, min_identical: float = 0.9, top: int = 5) -> int:
    """vLLM's check_logprobs_close: sequences must agree token for token until they first
    diverge, and there each side's token must be in the other's top ``top`` logprobs; after
    that point the rest of the sequence is not compared. Returns the number of bit-identical
    sequences and fails if fewer than ``min_identical`` of them are."""
    identical = 0
    for i, (a, b) in enumerate(zip(ref, other)):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        if ta == tb:
            identical += 1
            continue
        j = next(k for k in range(min(len(ta), len(tb))) if ta[k] != tb[k])
        top_a = a.outputs[0].logprobs[j].token_ids[1:top + 1]
        top_b = b.outputs[0].logprobs[j].token_ids[1:top + 1]
        assert tb[j] in top_a and ta[j] in top_b, (
            f"request {i} diverges at token {j}: {ta[j]} vs {tb[j]}, outside each other's top-{top}")
    assert identical >= min_identical * len(ref), f"only {identical}/{len(ref)} identical"
    return identical
