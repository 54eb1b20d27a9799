from jaxpage.engine.request import Request, RequestStatus
from jaxpage.sampling_params import SamplingParams


def test_token_views_and_append():
    r = Request("r", [5, 6, 7], SamplingParams(), seed=3, max_tokens=4, arrival_time=10.0,
                cache_salt="t")
    assert r.all_token_ids == [5, 6, 7] and r.num_tokens == 3 and r.num_prompt_tokens == 3
    r.append_output_token_ids(8)
    r.append_output_token_ids([9, 10])
    assert r.output_token_ids == [8, 9, 10] and r.all_token_ids == [5, 6, 7, 8, 9, 10]
    assert r.prompt_token_ids == [5, 6, 7] and r.num_output_tokens == 3
    assert r.num_computed_tokens == 0 and r.num_cached_tokens == -1 and r.num_preemptions == 0
    assert r.metrics.arrival_time == 10.0 and r.cache_salt == "t" and r.seed == 3
    assert r.status == RequestStatus.WAITING and not r.is_finished and r.finish_reason is None


def test_status_finish_reasons():
    assert [s.is_finished for s in RequestStatus] == [False] * 3 + [True] * 4
    assert [s.finish_reason for s in RequestStatus][3:] == ["stop", "length", "abort", "error"]
