import pytest

from jaxpage.config import SchedulerConfig
from jaxpage.engine.kv_cache_manager import KVCacheManager
from jaxpage.engine.request import Request, RequestStatus
from jaxpage.engine.scheduler import Scheduler
from jaxpage.engine.scheduler_output import ModelRunnerOutput
from jaxpage.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner, reference_generate

PS = 4
V = 1000


def make(num_pages=40, *, max_num_seqs=8, budget=64, max_model_len=64, chunked=True,
         caching=True, max_waiting=100):
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          max_model_len=max_model_len, enable_chunked_prefill=chunked,
                          max_waiting_requests=max_waiting)
    kv = KVCacheManager(num_pages, PS, enable_caching=caching)
    sched = Scheduler(cfg, kv)
    runner = FakeRunner(num_pages, PS, V, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                        scheduler=sched)
    return sched, kv, runner


def add(sched, req_id, tokens, max_tokens=4, stop_ids=(), **params) -> Request:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, **params)
    sp.all_stop_token_ids = set(sp.stop_token_ids) | set(stop_ids)
    request = Request(req_id, list(tokens), sp, seed=0, max_tokens=max_tokens)
    sched.add_request(request)
    return request


def step(sched, runner):
    so = sched.schedule()
    if so.is_empty and not so.finished_req_ids:
        return so, []
    return so, sched.update_from_output(so, runner.execute_model(so))


def run_all(sched, runner, max_steps=500):
    outputs = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outputs
        _, updates = step(sched, runner)
        for u in updates:
            outputs.setdefault(u.request.req_id, []).extend(u.new_token_ids)
    raise AssertionError("did not finish")


def manual_step(sched, tokens: dict[str, int], errors=None):
    """One step with a hand-written runner output: ``tokens[req_id]`` for requests that reach
    the end of their tokens."""
    so = sched.schedule()
    sampled = {}
    for rid in so.num_scheduled_tokens:
        r = sched.requests[rid]
        if r.num_computed_tokens >= r.num_tokens and rid in tokens:
            sampled[rid] = [tokens[rid]]
    return so, sched.update_from_output(so, ModelRunnerOutput(sampled, errors=errors or {}))


def test_chunked_prefill_chunk_sizes_and_diffs():
    sched, kv, runner = make(budget=8)
    a = add(sched, "a", range(1, 21), max_tokens=3)
    add(sched, "b", range(100, 105), max_tokens=3)
    so1, _ = step(sched, runner)
    assert [r.req_id for r in so1.scheduled_new_reqs] == ["a"]
    assert so1.scheduled_new_reqs[0].block_ids == [1, 2]
    step(sched, runner)
    so3, _ = step(sched, runner)
    assert so3.scheduled_cached_reqs.req_ids == ["a"]
    assert so3.scheduled_cached_reqs.new_token_ids == [[]]  # partial chunks sample nothing
    assert so3.scheduled_cached_reqs.new_block_ids == [[5]]
    assert so3.scheduled_cached_reqs.num_computed_tokens == [16]
    new_b = so3.scheduled_new_reqs[0]
    assert (new_b.req_id, new_b.num_computed_tokens, new_b.block_ids) == ("b", 0, [6])
    so4, _ = step(sched, runner)
    assert so4.scheduled_cached_reqs.new_token_ids == [[a.output_token_ids[0]], []]
    assert so4.scheduled_cached_reqs.new_block_ids == [[7], [8]]  # a: position 20 opens page 6
    run_all(sched, runner)
    assert runner.scheduled_log == [{"a": 8}, {"a": 8}, {"a": 4, "b": 4}, {"a": 1, "b": 1},
                                    {"a": 1, "b": 1}, {"b": 1}]
    assert a.output_token_ids == reference_generate(list(range(1, 21)), 3, V)
    assert kv.num_free_pages == 39


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits_fcfs():
    sched, kv, runner = make(budget=16, max_model_len=16, chunked=False)
    add(sched, "a", range(1, 11))
    add(sched, "b", range(20, 30))
    add(sched, "c", range(40, 43))  # would fit step 1, but FCFS keeps it behind b
    step(sched, runner)
    step(sched, runner)
    assert runner.scheduled_log == [{"a": 10}, {"a": 1, "b": 10, "c": 3}]


def test_max_num_seqs_caps_the_batch():
    sched, kv, runner = make(max_num_seqs=2)
    for i in range(3):
        add(sched, f"r{i}", [i + 1] * 3, max_tokens=2 + i)
    run_all(sched, runner)
    assert runner.scheduled_log[:3] == [{"r0": 3, "r1": 3}, {"r0": 1, "r1": 1}, {"r1": 1, "r2": 3}]
    assert max(runner.batch_sizes) == 2


def test_preemption_takes_the_tail_and_resumes_with_all_tokens():
    sched, kv, runner = make(num_pages=7, budget=64)  # 6 usable pages
    reqs = [add(sched, rid, range(k, k + 7), max_tokens=6, ignore_eos=True)
            for rid, k in (("a", 1), ("b", 100), ("c", 200))]
    step(sched, runner)  # three prefills of 7: two pages each, pool full
    assert [kv.get_block_ids(r) for r in "abc"] == [[1, 2], [3, 4], [5, 6]]
    step(sched, runner)  # token 8 of each still fits the second page
    waiting_added = add(sched, "late", [7, 7], max_tokens=1)
    so, _ = step(sched, runner)  # position 8 needs a third page: c, the tail, is preempted
    c = reqs[2]
    assert so.num_scheduled_tokens == {"a": 1, "b": 1}
    assert so.finished_req_ids == {"c"}
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert list(sched.waiting) == [c, waiting_added]  # back at the front, ahead of "late"
    assert len(c.output_token_ids) == 2  # outputs kept
    assert kv.get_block_ids("c") == []
    assert kv.get_block_ids("a") == [1, 2, 6] and kv.get_block_ids("b") == [3, 4, 5]
    resumed = None
    for _ in range(100):
        so, _ = step(sched, runner)
        for new in so.scheduled_new_reqs:
            if new.req_id == "c":
                resumed = new
    assert not sched.has_unfinished_requests()
    assert resumed.all_token_ids == list(range(200, 207)) + c.output_token_ids[:2]
    assert resumed.num_prompt_tokens == 7
    for r, k in zip(reqs, (1, 100, 200)):
        assert r.output_token_ids == reference_generate(list(range(k, k + 7)), 6, V)
    assert kv.num_free_pages == 6


def test_a_request_that_is_itself_the_tail_is_preempted_and_nothing_older_is_lost():
    sched, kv, runner = make(num_pages=5, budget=64)  # 4 usable pages
    a = add(sched, "a", range(1, 8), max_tokens=8, ignore_eos=True)  # up to 4 pages
    b = add(sched, "b", [9, 9, 9], max_tokens=8, ignore_eos=True)  # up to 3 pages
    out = run_all(sched, runner)
    assert a.num_preemptions == 0 and b.num_preemptions >= 1
    assert out["a"] == reference_generate(list(range(1, 8)), 8, V)
    assert b.output_token_ids == reference_generate([9, 9, 9], 8, V)
    assert kv.num_free_pages == 4


def test_prefix_hit_sets_num_computed_and_cached_tokens():
    sched, kv, runner = make()
    add(sched, "a", range(1, 11), max_tokens=1)
    run_all(sched, runner)
    b = add(sched, "b", list(range(1, 9)) + [77, 78], max_tokens=2)
    so, _ = step(sched, runner)
    new = so.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 8 and so.num_scheduled_tokens == {"b": 2}
    assert b.num_cached_tokens == 8 and sched.num_prefix_hit_tokens == 8
    run_all(sched, runner)
    assert b.output_token_ids == reference_generate(list(range(1, 9)) + [77, 78], 2, V)


def test_stop_conditions():
    sched, kv, _ = make()
    eos = add(sched, "eos", [1], max_tokens=9, stop_ids={2})
    user = add(sched, "user", [1], max_tokens=9, stop_token_ids=[5], stop_ids={2})
    mint = add(sched, "min", [1], max_tokens=9, min_tokens=3, stop_ids={2})
    ign = add(sched, "ignore", [1], max_tokens=3)  # EOS not in all_stop_token_ids
    manual_step(sched, {"eos": 2, "user": 5, "min": 2, "ignore": 2})
    assert eos.status == RequestStatus.FINISHED_STOPPED and eos.stop_reason is None
    assert user.status == RequestStatus.FINISHED_STOPPED and user.stop_reason == 5
    assert mint.status == RequestStatus.RUNNING and ign.status == RequestStatus.RUNNING
    assert eos.output_token_ids == [2] and kv.get_block_ids("eos") == []
    so, _ = manual_step(sched, {"min": 2, "ignore": 2})
    assert so.finished_req_ids == {"eos", "user"}
    manual_step(sched, {"min": 2, "ignore": 2})
    assert mint.status == RequestStatus.FINISHED_STOPPED and mint.output_token_ids == [2, 2, 2]
    assert ign.status == RequestStatus.FINISHED_LENGTH_CAPPED and ign.finish_reason == "length"
    assert not sched.has_unfinished_requests() and kv.num_free_pages == 39


def test_max_model_len_caps_length():
    sched, kv, _ = make(max_model_len=6)
    r = add(sched, "r", [1, 2, 3, 4], max_tokens=50)
    manual_step(sched, {"r": 7})
    manual_step(sched, {"r": 7})
    assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.num_tokens == 6


def test_finish_requests_aborts_running_and_waiting():
    sched, kv, runner = make(max_num_seqs=1)
    a = add(sched, "a", range(1, 6), max_tokens=9)
    b = add(sched, "b", range(1, 6), max_tokens=9)
    step(sched, runner)
    done = sched.finish_requests(["a", "b", "unknown", "a"], RequestStatus.FINISHED_ABORTED)
    assert done == [a, b]
    assert a.finish_reason == "abort" and b.status == RequestStatus.FINISHED_ABORTED
    assert not sched.has_unfinished_requests() and kv.num_free_pages == 39
    assert a.metrics.finished_time is not None
    so = sched.schedule()  # an empty batch that only tells the runner what to forget
    assert so.is_empty and so.finished_req_ids == {"a", "b"}
    runner.execute_model(so)
    assert runner.reqs == {}
    add(sched, "c", [3], max_tokens=1)
    so, _ = step(sched, runner)
    assert so.finished_req_ids == set()
    assert sched.schedule().finished_req_ids == {"c"}
    with pytest.raises(ValueError):
        sched.finish_requests("c", RequestStatus.RUNNING)


def test_runner_errors_finish_only_that_request():
    sched, kv, _ = make()
    bad = add(sched, "bad", [1, 2], max_tokens=5)
    good = add(sched, "good", [3, 4], max_tokens=5)
    _, updates = manual_step(sched, {"good": 9}, errors={"bad": "boom"})
    assert bad.status == RequestStatus.FINISHED_ERROR and bad.finish_reason == "error"
    assert [(u.request.req_id, u.error) for u in updates] == [("bad", "boom"), ("good", None)]
    assert good.status == RequestStatus.RUNNING and kv.get_block_ids("bad") == []
    # A runner that forgets to sample for a request that reached its end: error, not a hang.
    _, updates = manual_step(sched, {})
    assert good.status == RequestStatus.FINISHED_ERROR and "no token" in updates[0].error


def test_a_partial_chunk_never_appends_tokens():
    sched, _, _ = make(budget=4)
    r = add(sched, "r", range(1, 11))
    so = sched.schedule()
    updates = sched.update_from_output(so, ModelRunnerOutput({"r": [5]}))
    assert updates == [] and r.output_token_ids == [] and r.num_computed_tokens == 4


def test_waiting_queue_is_bounded():
    sched, _, _ = make(max_waiting=2)
    add(sched, "a", [1])
    add(sched, "b", [1])
    with pytest.raises(ValueError, match="full"):
        add(sched, "c", [1])
    with pytest.raises(ValueError, match="in use"):
        sched.add_request(Request("a", [1], SamplingParams(), seed=0, max_tokens=1), reserved=True)
    sched.add_request(Request("d", [1], SamplingParams(), seed=0, max_tokens=1), reserved=True)
    assert sched.get_num_unfinished_requests() == 3


def test_tokens_in_flight_are_scheduled_on_and_never_past_the_caps():
    """Async scheduling: schedule() runs again before the last step's tokens are known. A
    request that sampled is one token ahead (pending) and gets its next decode; once the
    tokens in flight reach ``max_tokens`` it is not scheduled again."""
    sched, kv, _ = make()
    r = add(sched, "a", [1, 2, 3, 4], max_tokens=2)
    so1 = sched.schedule()
    assert so1.num_scheduled_tokens == {"a": 4} and r.num_pending_tokens == 1
    so2 = sched.schedule()  # step 1 still in flight
    assert so2.num_scheduled_tokens == {"a": 1} and r.num_pending_tokens == 2
    assert so2.scheduled_cached_reqs.new_token_ids == [[]]  # the runner reads it on device
    assert sched.schedule().is_empty  # 2 tokens in flight = max_tokens: nothing to compute
    sched.update_from_output(so1, ModelRunnerOutput(sampled_token_ids={"a": [7]}))
    assert r.output_token_ids == [7] and r.num_pending_tokens == 1 and not r.is_finished
    updates = sched.update_from_output(so2, ModelRunnerOutput(sampled_token_ids={"a": [8]}))
    assert r.output_token_ids == [7, 8] and r.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert updates[0].finished and kv.num_free_pages == 39


def test_a_request_stopped_by_a_token_drops_the_one_in_flight():
    sched, kv, _ = make()
    r = add(sched, "a", [1, 2, 3], max_tokens=10, stop_ids=(9,))
    so1 = sched.schedule()
    so2 = sched.schedule()
    sched.update_from_output(so1, ModelRunnerOutput(sampled_token_ids={"a": [9]}))
    assert r.status == RequestStatus.FINISHED_STOPPED and r.output_token_ids == [9]
    assert sched.update_from_output(so2, ModelRunnerOutput(sampled_token_ids={"a": [5]})) == []
    assert r.output_token_ids == [9] and kv.num_free_pages == 39
    assert sched.schedule().finished_req_ids == {"a"}
