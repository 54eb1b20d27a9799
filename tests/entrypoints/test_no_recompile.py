"""Steady state never compiles: after start-up (every bucket AOT-compiled) a randomized workload
of 200+ requests lowers no new executable. Counted with JAX's public monitoring hooks."""

import numpy as np
import pytest
from jax import monitoring

from jaxpage import SamplingParams
from tests.entrypoints.engine_util import random_prompts, tiny_llm

LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@pytest.mark.parametrize("workers", [1, 3])
def test_randomized_workload_triggers_no_compilation(workers):
    """Also with the start-up compiles on 3 threads (``compile_workers``): every bucket is
    there, and each gives the tokens of the one-by-one start-up."""
    llm = tiny_llm(max_num_seqs=16, max_num_batched_tokens=128, compile_all_buckets=True,
                   max_model_len=128, compile_workers=workers)
    runner = llm.engine.model_runner
    b = runner.buckets
    assert set(runner._compiled) == ({(*p, False, False, False) for p in b.pairs()}
                                     | {(*b.pick(r, r), False, True, False)
                                        for r in b.req_buckets})
    events = []
    monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: events.append(name) if name == LOWERING_EVENT else None)

    rng = np.random.default_rng(0)
    prompts = random_prompts(240, 512, 1, 70, seed=11, shared_prefix=8)
    choices = [dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1.0, top_p=0.9),
               dict(temperature=0.7, top_k=20, min_p=0.05)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 24)), seed=int(rng.integers(1 << 30)),
                             stop_token_ids=[int(rng.integers(3, 512))], **choices[i % 4])
              for i in range(len(prompts))]
    # Two waves, so requests join and leave a running batch of varying size.
    outs = llm.generate(prompts[:120], params[:120], use_tqdm=False)
    outs += llm.generate(prompts[120:], params[120:], use_tqdm=False)
    assert len(outs) == 240 and all(o.finished for o in outs)
    assert events == [], f"{len(events)} compilations in steady state"
    TOKENS[workers] = [o.outputs[0].token_ids for o in outs]
    if len(TOKENS) == 2:
        assert TOKENS[1] == TOKENS[3]


TOKENS: dict[int, list] = {}
