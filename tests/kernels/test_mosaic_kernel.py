"""The Mosaic GPU (Hopper) ragged kernel against the reference.

CPU (CI): a few cases in Mosaic GPU's interpreter — it runs the kernel's real protocol (TMA
copies, barriers between the memory and compute warpgroups, the K/V ring, ladder stores) with
plain dots in place of wgmma, which the interpreter cannot take in this form — and the export
of the real kernel for ``cuda``. GPU (marker ``gpu``): every case compiled on a Hopper card.
Every unused KV slot is NaN (``paged_inputs.make_inputs``), so a read past ``kv_len`` fails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage.kernels_pallas import gpu
from jaxpage.kernels_pallas.gpu import ragged_mosaic
from jaxpage.kernels_pallas.gpu import _mosaic_common as _mc
from tests.kernels.paged_inputs import assert_close
from tests.kernels.test_gpu_kernels import Case, _expected

BF16, F16 = jnp.bfloat16, jnp.float16

CASES = [
    # prefill chunks with context, decodes, an empty request mid-batch, padding rows + requests;
    # requests start at rows that are not multiples of 8, T is not one either
    Case("m-mixed-g4-h64-s16", (5, 1, 20, 0, 1), (9, 17, 40, 0, 3), 2, 4, 64, 16, BF16,
         num_tokens=30, num_reqs=7),
    # lengths at page edges, G = 8 (8-token query blocks), page 64 (one TMA copy per block)
    Case("m-edges-g8-h128-s64", (1, 1, 3, 2, 9), (1, 63, 64, 65, 200), 1, 8, 128, 64, BF16,
         num_reqs=8),
    # G = 1 (64-token blocks), several KV blocks, float16
    Case("m-prefill-g1-h128-s32", (70, 33), (70, 100), 2, 1, 128, 32, F16, num_tokens=110),
    # soft cap + sliding window, page 128 (blocks are slices of a page)
    Case("m-cap-window-g4-h64-s128", (7, 1, 20), (130, 129, 20), 1, 4, 64, 128, BF16,
         num_tokens=32, soft_cap=20.0, sliding_window=50),
    # G = 2, long chunk behind a long context: many unmasked blocks, then the diagonal
    Case("m-long-g2-h64-s16", (90, 1), (300, 257), 2, 2, 64, 16, BF16, num_tokens=96),
    # decode-only batch, ragged lengths
    Case("m-dec-g4-h128-s16", (1,) * 5, (1, 15, 16, 17, 300), 2, 4, 128, 16, BF16,
         num_tokens=8, num_reqs=6),
    # G = 8 over 2 kv heads: decodes at page edges beside a short prefill chunk
    Case("m-dec16-g8-h64-s16", (1, 1, 3, 1), (1, 130, 20, 64), 2, 8, 64, 16, BF16,
         num_tokens=8, num_reqs=5),
    Case("m-dec16-g4-h128-s32", (1, 1, 9, 1), (33, 300, 9, 2), 4, 4, 128, 32, BF16,
         num_tokens=16, soft_cap=30.0, sliding_window=100),
]
INTERPRET_CASES = [CASES[0], CASES[3]]  # the interpreter takes ~20 s per small case


def _run(case, x, interpret, **kw):
    return ragged_mosaic.ragged_paged_attention(*x.args(), **case.attn_kwargs,
                                                interpret=interpret, **kw)


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: c.id)
def test_interpret_matches_reference(case):
    x = case.inputs()
    out = _run(case, x, interpret=True)
    assert out.shape == x.q.shape and out.dtype == x.q.dtype
    assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)


# An engine bucket far above the step's tokens: 314 padding rows over 2 kv heads, so the
# padding request's items (PAD_SPANS spans of 32 rows each) write full and partial bands and
# its later slots are empty. Every padding row must come out zero.
PAD_CASE = Case("m-pad-g4-h64-s16", (5, 1), (20, 9), 2, 4, 64, 16, BF16, num_tokens=320,
                num_reqs=3)


def test_interpret_many_padding_rows():
    case = PAD_CASE
    x = case.inputs()
    assert x.q.shape[0] - x.num_valid_rows > _mc.PAD_SPANS * 32
    out = _run(case, x, interpret=True)
    assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)


def test_interpret_shallow_ring_many_blocks():
    # depth 2: the ring of 64-token blocks wraps (300 keys = 5 blocks) before the diagonal.
    case = CASES[4]
    x = case.inputs()
    out = _run(case, x, interpret=True, depth=2)
    assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)


@pytest.mark.parametrize("case,order", [(CASES[0], "natural"), (CASES[4], "lpt")],
                         ids=lambda c: getattr(c, "id", c))
def test_interpret_two_tiles_pingpong_persistent(case, order):
    # Two 64-row tiles per item on one K/V stream, taking turns on the tensor cores: the
    # earlier tile has fewer blocks (causal) and releases the rest unread; decodes leave the
    # second tile empty (no turns then); padding spans; an empty request mid-batch. Three
    # persistent CTAs: each takes several items, its K/V ring running on from one to the next.
    x = case.inputs()
    out = _run(case, x, interpret=True, q_tiles=2, depth=2, programs=3, order=order)
    assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)


def test_interpret_two_tiles_window_no_pingpong():
    case = CASES[3]  # soft cap + sliding window: the item's first block is the first tile's
    x = case.inputs()
    out = _run(case, x, interpret=True, q_tiles=2, pingpong=False, programs=2)
    assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)


@pytest.mark.parametrize("kw", [dict(q_tiles=2), dict(q_tiles=2, pingpong=False),
                                dict(q_tiles=2, block_kv=64, depth=4, compute_regs=232),
                                dict(q_tiles=2, compute_regs=240),
                                dict(q_tiles=2, profile_regions=("q_in", "out"))],
                         ids=str)
def test_export_variants_lower_for_cuda(kw):
    case = CASES[7]
    x = case.inputs()
    fn = functools.partial(ragged_mosaic.ragged_paged_attention, **case.attn_kwargs, **kw)
    assert "mosaic_gpu" in jax.export.export(jax.jit(fn), platforms=("cuda",))(
        *x.args()).mlir_module()


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: c.id)
def test_export_lowers_for_cuda_at_any_row_count(case):
    # Q rows on 8-row boundaries are copied straight into the swizzled tile only where Q's row
    # count is a multiple of 8 (Mosaic GPU tiles the global side too); 30 and 110 rows take
    # the untiled copy and re-layout for every item.
    x = case.inputs()
    assert x.q.shape[0] % 8
    fn = functools.partial(ragged_mosaic.ragged_paged_attention, **case.attn_kwargs)
    assert "mosaic_gpu" in jax.export.export(jax.jit(fn), platforms=("cuda",))(
        *x.args()).mlir_module()


def _natural_items(q_lens, num_seqs, span, num_slots, num_kv_heads):
    """The work list by its definition: request b's spans start at slot qsl[b] // span + b;
    request num_seqs (padding) owns the slots from its first to the end, ``PAD_SPANS`` spans
    an item."""
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    owner = []
    for slot in range(num_slots):
        b = max(b for b in range(num_seqs + 1) if qsl[b] // span + b <= slot)
        per = span * (_mc.PAD_SPANS if b == num_seqs else 1)
        owner.append((b, (slot - (qsl[b] // span + b)) * per))
    return np.array([(b, h, t) for h in range(num_kv_heads) for b, t in owner])


def _per_cta(schedule):
    """The work list as one list of (request, kv head, first token) per CTA."""
    items, starts = (np.asarray(a) for a in schedule)
    assert starts[0] == 0 and starts[-1] == len(items) and np.all(np.diff(starts) >= 0)
    return [[tuple(r) for r in items[a:b]] for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("programs", [1 << 20, 7])
def test_item_schedule_orders(programs):
    # 3 live requests (a 40-token chunk behind 100 tokens of context, a decode, an 8-token
    # chunk), one dead row; span 16 tokens, 2 kv heads.
    q_lens, kv_lens = [40, 1, 8, 0], [140, 50, 8, 0]
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    span, num_tokens, num_kv = 16, 56, 2
    num_slots = num_tokens // span + len(q_lens) + 1
    programs = min(programs, num_slots * num_kv)
    kw = dict(span=span, num_slots=num_slots, num_kv_heads=num_kv, block_kv=64,
              programs=programs)
    sched = functools.partial(ragged_mosaic.item_schedule, jnp.asarray(kv_lens, jnp.int32), qsl)
    want = [tuple(r) for r in _natural_items(q_lens, 3, span, num_slots, num_kv)]
    # natural: entry k of the list by its definition goes to CTA k % programs
    nat = _per_cta(sched(jnp.int32(3), order="natural", **kw))
    assert len(nat) == programs
    assert nat == [want[p::programs] for p in range(programs)]
    lpt = _per_cta(sched(jnp.int32(3), order="lpt", **kw))
    assert sorted(sum(lpt, [])) == sorted(want)  # a permutation
    # KV blocks of each item (64-token blocks; causal end of its span)
    blocks = {(0, 0): 2, (0, 16): 3, (0, 32): 3, (1, 0): 1, (2, 0): 1}
    cost = [[blocks.get((b, t), 0) for b, _, t in cta] for cta in lpt]
    # Round r hands out the r-th entries of every CTA: in snake order (reversed when r is
    # odd) the rounds together run longest first.
    flat = []
    for r in range(max(map(len, cost))):
        rnd = [c[r] for c in cost if len(c) > r]
        flat += rnd[::-1] if r % 2 else rnd
    assert flat == sorted(flat, reverse=True)
    # "auto": batch order with a decode in the batch (request 1), longest first without one
    assert _per_cta(sched(jnp.int32(3), order="auto", **kw)) == nat
    q2 = [40, 3, 8, 0]
    qsl2 = jnp.asarray(np.concatenate([[0], np.cumsum(q2)]), jnp.int32)
    kv2 = jnp.asarray([140, 52, 8, 0], jnp.int32)
    auto = ragged_mosaic.item_schedule(kv2, qsl2, jnp.int32(3), order="auto", **kw)
    assert _per_cta(auto) == _per_cta(
        ragged_mosaic.item_schedule(kv2, qsl2, jnp.int32(3), order="lpt", **kw))


@pytest.mark.parametrize("n", [1, 9, 1040, _mc.RANK_SORT_MAX + 3])
def test_largest_first_is_a_stable_descending_argsort(n):
    # Costs with many ties (the counting path must keep index order among equals), on both
    # sides of the size where it hands over to XLA's sort.
    cost = jnp.asarray(np.random.default_rng(n).integers(0, 12, n), jnp.int32)
    got = np.asarray(_mc._largest_first(cost))
    want = sorted(range(n), key=lambda i: (-int(cost[i]), i))
    np.testing.assert_array_equal(got, want)


def test_item_scalars_by_definition():
    # 3 live requests, one dead row; the padding pseudo request (b = 3) owns rows [56, 64).
    q_lens, kv_lens = [40, 1, 8, 0], [140, 50, 8, 0]
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    num_tokens, span, num_kv = 64, 16, 2
    num_slots = num_tokens // span + len(q_lens) + 1
    items, _ = ragged_mosaic.item_schedule(
        jnp.asarray(kv_lens, jnp.int32), jnp.asarray(qsl, jnp.int32), jnp.int32(3), span=span,
        num_slots=num_slots, num_kv_heads=num_kv, block_kv=64, order="lpt", programs=5)
    full = np.asarray(ragged_mosaic.item_scalars(
        items, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(qsl, jnp.int32), jnp.int32(3),
        num_tokens))
    assert full.shape == (len(items), _mc.ITEM_COLS)
    np.testing.assert_array_equal(full[:, :3], np.asarray(items))
    for req, _, _, q_start, q_len, kv_len, is_pad in full:
        assert is_pad == (req == 3)
        assert q_start == qsl[req]
        assert q_len == (num_tokens if req == 3 else qsl[req + 1]) - qsl[req]
        assert kv_len == kv_lens[min(req, 3)]


def test_export_lowers_for_cuda():
    """The real kernel (wgmma, TMA) lowers to Mosaic GPU's custom call from a CPU machine."""
    case = CASES[3]
    x = case.inputs()
    fn = functools.partial(ragged_mosaic.ragged_paged_attention, **case.attn_kwargs)
    exported = jax.export.export(jax.jit(fn), platforms=("cuda",))(*x.args())
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("num_tokens,num_reqs,group", [(8, 1, 4), (8, 8, 8), (16, 32, 1),
                                                       (512, 32, 4), (136, 3, 2)])
def test_export_engine_bucket_shapes(num_tokens, num_reqs, group):
    """Lowering is shape-dependent (grid size, TMA boxes wider than a tiny batch): the Mosaic
    kernel lowers for cuda at engine-like buckets, H = 128, bf16, page 16."""
    q = jax.ShapeDtypeStruct((num_tokens, 2 * group, 128), BF16)
    pool = jax.ShapeDtypeStruct((64, 2, 2, 16, 128), BF16)
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    fn = functools.partial(ragged_mosaic.ragged_paged_attention, sm_scale=0.1)
    exported = jax.export.export(jax.jit(fn), platforms=("cuda",))(
        q, pool, i32((num_reqs,)), i32((num_reqs, 20)), i32((num_reqs + 1,)), i32((1,)))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("args,why", [
    ((32, 8, 128, 16, jnp.float32), "dtype"),
    ((32, 8, 96, 16, BF16), "head_dim"),
    ((32, 2, 128, 16, BF16), "group"),  # G = 16: 4-token blocks
    ((24, 8, 128, 16, BF16), "group"),  # G = 3
    ((32, 8, 128, 4, BF16), "page_size"),
])
def test_supported_says_why_not(args, why):
    assert why in ragged_mosaic.supported(*args)
    assert ragged_mosaic.supported(32, 8, 128, 16, BF16) is None


@pytest.mark.parametrize("q_tiles, compute_regs, want", [
    (2, 232, 40), (2, 240, 24), (2, 200, 40), (1, 232, 40), (1, 256, 40), (2, 248, None),
    (2, 236, None), (1, 264, None)])
def test_memory_regs_fit_the_register_file(q_tiles, compute_regs, want):
    # 64K registers over (q_tiles + 1) warpgroups of 128 threads: 168 each for three, so two
    # compute warpgroups at 232 leave 40 and at 240 leave 24 (setmaxnreg's least).
    if want is None:
        with pytest.raises(ValueError, match="setmaxnreg"):
            _mc.memory_regs(q_tiles, compute_regs)
    else:
        assert _mc.memory_regs(q_tiles, compute_regs) == want
        assert want + q_tiles * compute_regs <= 65536 // 128


def test_rejects_unsupported_shapes_with_a_clear_error():
    case = CASES[0]
    x = case.inputs()
    with pytest.raises(ValueError, match="order must be"):
        _run(case, x, interpret=True, order="random")
    with pytest.raises(ValueError, match="q_tiles must be 1 or 2"):
        _run(case, x, interpret=True, q_tiles=3)
    with pytest.raises(ValueError, match="bytes of shared memory"):
        _run(case, x, interpret=True, q_tiles=2, block_kv=256, depth=4)
    with pytest.raises(ValueError, match="compute_regs 248 with 2 compute warpgroups"):
        _run(case, x, interpret=True, q_tiles=2, compute_regs=248)
    with pytest.raises(ValueError, match="does not take dtype float32"):
        ragged_mosaic.ragged_paged_attention(x.q.astype(jnp.float32),
                                             x.kv_pages.astype(jnp.float32), *x.args()[2:],
                                             sm_scale=0.1)


def test_dispatch_takes_mosaic_when_asked():
    case = CASES[3]
    x = case.inputs()
    out = gpu.ragged_paged_attention(*x.args(), **case.attn_kwargs, ragged_impl="mosaic",
                                     interpret=True)
    assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)
    with pytest.raises(ValueError, match="ragged_impl"):
        gpu.ragged_paged_attention(*x.args(), **case.attn_kwargs, ragged_impl="cuda")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU answer")
def test_auto_never_picks_mosaic_off_gpu():
    x = CASES[0].inputs()
    assert not gpu.mosaic_applies(x.q, x.kv_pages)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
class TestMosaicCompiled:
    def test_auto_dispatch_on_hopper(self):
        case = CASES[5]  # head_dim 128
        x = case.inputs()
        hopper = str(jax.devices()[0].compute_capability).startswith("9")
        assert gpu.mosaic_applies(x.q, x.kv_pages) == hopper
        y = CASES[0].inputs()  # head_dim 64: measured slower there, so Triton
        assert not gpu.mosaic_applies(y.q, y.kv_pages)
        assert not gpu.mosaic_applies(x.q.astype(jnp.float32), x.kv_pages.astype(jnp.float32))
        out = gpu.ragged_paged_attention(*x.args(), **case.attn_kwargs)
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("case", CASES + [PAD_CASE], ids=lambda c: c.id)
    def test_matches_reference(self, case):
        x = case.inputs()
        out = _run(case, x, interpret=False)
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("kw", [
        dict(block_kv=64, depth=2), dict(block_kv=64, depth=4), dict(block_kv=192, depth=1),
        dict(q_tiles=1), dict(q_tiles=2), dict(q_tiles=2, compute_regs=232),
        dict(q_tiles=2, pingpong=False), dict(q_tiles=2, block_kv=64, depth=4),
        dict(q_tiles=2, block_kv=64, depth=3, compute_regs=232), dict(programs=7),
        dict(q_tiles=2, order="lpt"), dict(q_tiles=2, programs=5, order="lpt"),
        dict(q_tiles=2, programs=1 << 20), dict(order="lpt", programs=1 << 20),
        dict(q_tiles=2, compute_regs=240)], ids=str)
    def test_configs(self, kw):
        for case in (CASES[0], CASES[1], CASES[4], CASES[5], CASES[6], CASES[7]):
            x = case.inputs()
            out = _run(case, x, interpret=False, **kw)
            assert_close(out, _expected(case, x), dtype=case.dtype,
                         num_valid_rows=x.num_valid_rows)

    def test_large_mixed_batch(self):
        case = Case("m-gpu-big", (512, 1, 300, 1) + (1,) * 12,
                    (1024, 4000, 300, 17) + tuple(range(100, 1300, 100)), 8, 4, 128, 16, BF16,
                    num_tokens=1024)
        x = case.inputs()
        out = _run(case, x, interpret=False)
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)
