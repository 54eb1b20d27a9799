"""The packed step buffer: exact ids, positions, slots and block tables for a mixed batch."""

import numpy as np

from jaxpage.engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from jaxpage.runner.input_batch import InputBatch, PackedLayout, packing_order
from jaxpage.sampling_params import SamplingParams

S = 4  # page size


def _new(req_id, tokens, blocks, computed=0):
    return NewRequestData(req_id=req_id, all_token_ids=tokens, num_prompt_tokens=len(tokens),
                          sampling_params=SamplingParams(), seed=1, block_ids=blocks,
                          num_computed_tokens=computed)


def test_mixed_prefill_chunk_and_decode():
    batch = InputBatch(max_num_reqs=4, max_model_len=32, pages_per_req=8, page_size=S)
    # Step 1: "a" prefills 6 tokens in full; "b" has a 4-token prefix-cache hit, runs 3 more.
    so1 = SchedulerOutput([_new("a", list(range(100, 106)), [7, 3]),
                           _new("b", list(range(200, 207)), [5, 9], computed=4)],
                          CachedRequestData(), {"a": 6, "b": 3}, 9, set())
    batch.update(so1)
    layout = PackedLayout(16, 4, 8)
    a = layout.unpack(batch.prepare(so1, ["a", "b"], layout))
    assert a["input_ids"][:9].tolist() == [100, 101, 102, 103, 104, 105, 204, 205, 206]
    assert a["positions"][:9].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    assert a["slot_mapping"][:9].tolist() == [28, 29, 30, 31, 12, 13, 36, 37, 38]
    assert (a["slot_mapping"][9:] < S).all()  # padding writes only into the null page
    assert a["query_start_loc"].tolist() == [0, 6, 9, 9, 9]
    assert a["seq_lens"].tolist() == [6, 7, 0, 0]
    assert a["num_seqs"].tolist() == [2]
    assert a["logits_indices"][:2].tolist() == [5, 8]
    assert a["block_tables"][0, :2].tolist() == [7, 3] and a["block_tables"][2:].sum() == 0

    # Step 2: "a" decodes its sampled token 106 and needs a third page; "b" finished.
    so2 = SchedulerOutput([], CachedRequestData(["a"], [[106]], [[11]], [6]), {"a": 1}, 1, {"b"})
    batch.update(so2)
    assert "b" not in batch.requests
    a = layout.unpack(batch.prepare(so2, ["a"], layout))
    assert a["input_ids"][0] == 106 and a["positions"][0] == 6
    assert a["slot_mapping"][0] == 3 * S + 2  # page 3, offset 2
    assert a["block_tables"][0, :3].tolist() == [7, 3, 11]
    assert a["seq_lens"][0] == 7


def test_slots_are_reused_after_finish():
    batch = InputBatch(max_num_reqs=2, max_model_len=8, pages_per_req=2, page_size=S)
    so = SchedulerOutput([_new("x", [1, 2], [1]), _new("y", [3], [2])], CachedRequestData(),
                         {"x": 2, "y": 1}, 3, set())
    batch.update(so)
    batch.update(SchedulerOutput([_new("z", [4], [3])], CachedRequestData(), {"z": 1}, 1, {"x"}))
    assert sorted(batch.requests) == ["y", "z"]
    assert np.array_equal(batch.token_ids[batch.requests["z"].slot, :1], [4])


def test_packing_order_starts_chunks_on_8_row_boundaries():
    # running decodes first, then new chunks, as the scheduler lists them
    num_scheduled = {"d0": 1, "c37": 37, "d1": 1, "c512": 512, "c40": 40, "c3": 3, "d2": 1}
    order = packing_order(num_scheduled)
    assert order == ["c512", "c40", "c37", "c3", "d0", "d1", "d2"]  # stable within each kind
    starts = np.cumsum([0] + [num_scheduled[r] for r in order])[:-1]
    assert [s % 8 for s in starts[:3]] == [0, 0, 0]  # every multiple-of-8 chunk, and one more
    assert sorted(order) == sorted(num_scheduled)



def test_drafts_are_staged_and_each_position_gets_a_logits_row():
    batch = InputBatch(max_num_reqs=4, max_model_len=32, pages_per_req=8, page_size=S)
    so1 = SchedulerOutput([_new("a", [10, 11, 12], [2, 6]), _new("b", [20, 21], [4])],
                          CachedRequestData(), {"a": 3, "b": 2}, 5, set())
    batch.update(so1)
    # Step 2: "a" runs its sampled token 13 and drafts 14, 15; "b" runs 22 alone.
    so2 = SchedulerOutput([], CachedRequestData(["a", "b"], [[13], [22]], [[], []], [3, 2]),
                          {"a": 3, "b": 1}, 4, set(),
                          scheduled_spec_decode_tokens={"a": [14, 15]})
    batch.update(so2)
    layout = PackedLayout(16, 4, 8, num_logits=8)
    a = layout.unpack(batch.prepare(so2, ["a", "b"], layout))
    assert a["input_ids"][:4].tolist() == [13, 14, 15, 22]
    assert a["positions"][:4].tolist() == [3, 4, 5, 2]
    assert a["placeholder_slots"][:4].tolist() == [0, 0, 0, 0]  # drafts are known ids
    assert a["slot_mapping"][:4].tolist() == [2 * S + 3, 6 * S, 6 * S + 1, 4 * S + 2]
    assert a["seq_lens"][:2].tolist() == [6, 3]
    assert a["logits_indices"][:4].tolist() == [0, 1, 2, 3]  # a: all three rows; b: its last
    assert batch.requests["a"].num_tokens == 4  # drafts are not tokens yet
    # Step 3: "a" kept draft 14 and sampled 16 after it; its next input overwrites draft 15.
    so3 = SchedulerOutput([], CachedRequestData(["a"], [[14, 16]], [[]], [5]), {"a": 1}, 1,
                          set())
    batch.update(so3)
    a = layout.unpack(batch.prepare(so3, ["a"], layout))
    assert a["input_ids"][0] == 16 and a["positions"][0] == 5
    assert batch.token_ids[batch.requests["a"].slot, :6].tolist() == [10, 11, 12, 13, 14, 16]


def test_packed_arrays_start_256_byte_aligned():
    """Mosaic GPU's custom call rejects an input not 256-byte aligned, and XLA passes a kernel
    the block tables as a view into the packed buffer (NOTES.md, session 17): every array
    starts at a multiple of 64 int32s, in every bucket shape, and the arrays do not overlap."""
    for t, r, p, rows in [(16, 8, 8, 0), (32, 8, 5, 0), (48, 16, 3, 0), (100, 12, 7, 40),
                          (2048, 256, 128, 0)]:
        layout = PackedLayout(t, r, p, num_logits=rows)
        offsets, sizes = layout.offsets(), layout.sizes()
        assert all(off * 4 % 256 == 0 for off in offsets.values()), (t, r, p, offsets)
        spans = sorted((off, off + sizes[name]) for name, off in offsets.items())
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        assert layout.total == spans[-1][1]
        buf = np.arange(layout.total, dtype=np.int32)
        a = layout.unpack(buf)
        assert a["block_tables"].shape == (r, p)
        assert a["block_tables"][0, 0] == offsets["block_tables"]
        assert a["placeholder_slots"][-1] == layout.total - 1
