"""GPU paged-attention kernels (Pallas, Triton lowering) against the reference.

``TestGpuKernelsInterpret`` runs every case in Pallas' interpreter on CPU (CI);
``TestGpuKernelsCompiled`` runs the same cases compiled on a real GPU (marker ``gpu``).
Cases are a sampled product — GQA 1/3/4/8, head_dim 64/128, page sizes 16..128, float32 and
bfloat16, lengths 0/1/S-1/S/S+1/long, padding rows and requests, soft cap, sliding window —
with every unused KV slot NaN (see ``paged_inputs.make_inputs``).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import pytest

from jaxpage import kernels_pallas
from jaxpage.kernels_pallas import gpu, reference
from jaxpage.kernels_pallas.gpu import ragged_attention
from tests.kernels.paged_inputs import assert_close, make_inputs

F32, BF16 = jnp.float32, jnp.bfloat16
FP8_E4M3, FP8_E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    num_kv_heads: int
    group: int
    head_dim: int
    page_size: int
    dtype: object
    num_tokens: int | None = None  # padded T
    num_reqs: int | None = None  # padded R
    soft_cap: float | None = None
    sliding_window: int | None = None
    kv_dtype: object = None  # the pool's, when not q's (fp8)

    def inputs(self):
        seed = zlib.crc32(self.id.encode())  # different per case, stable across runs
        return make_inputs(seed, q_lens=self.q_lens, kv_lens=self.kv_lens,
                           num_kv_heads=self.num_kv_heads, group=self.group,
                           head_dim=self.head_dim, page_size=self.page_size, dtype=self.dtype,
                           num_tokens=self.num_tokens, num_reqs=self.num_reqs,
                           kv_dtype=self.kv_dtype)

    @property
    def attn_kwargs(self):
        return dict(sm_scale=self.head_dim ** -0.5, soft_cap=self.soft_cap,
                    sliding_window=self.sliding_window)


# Mixed prefill (chunks with earlier context) + decode batches; 0-length request mid-batch.
RAGGED_CASES = [
    Case("mixed-g4-h64-s16-f32", (5, 1, 9, 0, 1), (5, 17, 40, 0, 33), 2, 4, 64, 16, F32,
         num_tokens=24, num_reqs=7),
    Case("prefill-g1-h128-s32-bf16", (31, 33), (31, 100), 2, 1, 128, 32, BF16, num_tokens=72),
    Case("edges-g8-h128-s64-bf16", (1, 1, 3, 2, 1), (1, 63, 64, 65, 200), 1, 8, 128, 64, BF16,
         num_reqs=8),
    Case("cap-window-g4-h64-s128-f32", (7, 1, 20), (130, 129, 20), 1, 4, 64, 128, F32,
         num_tokens=32, soft_cap=20.0, sliding_window=50),
    Case("long-g8-h64-s16-bf16", (70, 1), (300, 257), 1, 8, 64, 16, BF16, num_tokens=80),
    Case("g3-h64-s32-f32", (4, 1, 6), (4, 31, 70), 3, 3, 64, 32, F32, num_tokens=16),
    # head_dim 256 (the table's 256 entry: 32-key blocks, decode tile of 64 keys)
    Case("mixed-g2-h256-s16-bf16", (6, 1, 1, 17), (40, 70, 1, 17), 2, 2, 256, 16, BF16,
         num_tokens=32),
    # fp8 pools (K/V upcast to q's dtype after the load); the oracle reads the same fp8 pool
    Case("mixed-g4-h128-s16-bf16-fp8e4m3", (9, 1, 1, 20), (40, 16, 65, 20), 2, 4, 128, 16,
         BF16, num_tokens=40, kv_dtype=FP8_E4M3),
    Case("mixed-g4-h64-s32-f32-fp8e5m2", (5, 1, 3), (5, 33, 70), 2, 4, 64, 32, F32,
         num_tokens=16, soft_cap=20.0, kv_dtype=FP8_E5M2),
]
# Decode-only batches (every live request has q_len 1, row b = request b).
DECODE_CASES = [
    Case("dec-g4-h128-s16-bf16", (1,) * 5, (1, 15, 16, 17, 300), 2, 4, 128, 16, BF16,
         num_tokens=8, num_reqs=6),
    Case("dec-g1-h64-s64-f32", (1,) * 4, (63, 64, 65, 1), 2, 1, 64, 64, F32),
    Case("dec-g8-h64-s128-bf16", (1,) * 3, (129, 1, 500), 1, 8, 64, 128, BF16, num_tokens=4,
         soft_cap=30.0, sliding_window=100),
    Case("dec-g8-h128-s32-f32", (1,) * 2, (33, 256), 2, 8, 128, 32, F32, num_reqs=3),
    Case("dec-g4-h256-s32-bf16", (1,) * 3, (31, 200, 65), 2, 4, 256, 32, BF16, num_tokens=4),
    Case("dec-g8-h128-s64-bf16-fp8e4m3", (1,) * 3, (63, 130, 1), 1, 8, 128, 64, BF16,
         num_reqs=4, sliding_window=100, kv_dtype=FP8_E4M3),
    Case("dec-g4-h64-s16-f32-fp8e5m2", (1,) * 2, (17, 300), 2, 4, 64, 16, F32,
         kv_dtype=FP8_E5M2),
]


def _expected(case, x):
    # True f32 products: on GPUs XLA's default f32 matmul is tf32 (~1e-3), too loose an oracle.
    with jax.default_matmul_precision("highest"):
        return reference.ragged_paged_attention(*x.args(), **case.attn_kwargs)


class TestGpuKernelsInterpret:
    interpret = True

    @pytest.mark.parametrize("case", RAGGED_CASES + DECODE_CASES, ids=lambda c: c.id)
    def test_ragged_kernel(self, case):
        x = case.inputs()
        out = gpu.ragged_kernel(*x.args(), **case.attn_kwargs, interpret=self.interpret)
        assert out.shape == x.q.shape and out.dtype == x.q.dtype
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("split_causal", [False, True])
    def test_ragged_masked_everywhere_or_split(self, split_causal):
        # Small blocks so the unmasked below-diagonal loop runs many iterations.
        case = RAGGED_CASES[4]
        x = case.inputs()
        out = gpu.ragged_kernel(*x.args(), **case.attn_kwargs, block_m=16, block_kv=16,
                                split_causal=split_causal, interpret=self.interpret)
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("variant", [
        dict(decode_tile=False, order="natural"),  # single-token requests on the prefill tile
        dict(decode_tile=True, order="reverse", decode_block_kv=16),
    ], ids=["prefill-tile-natural", "decode-tile-reverse"])
    def test_ragged_decode_tile_and_order(self, variant):
        case = RAGGED_CASES[0]  # decodes, prefill chunks and an empty request mid-batch
        x = case.inputs()
        out = gpu.ragged_kernel(*x.args(), **case.attn_kwargs, **variant,
                                interpret=self.interpret)
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("case_idx", [0, 1, 3, 4, 5])  # 1: prefill only ("auto" -> lpt)
    @pytest.mark.parametrize("order,decode_tile", [("lpt", True), ("lpt", False),
                                                   ("auto", True)])
    def test_ragged_scheduled_order(self, case_idx, order, decode_tile):
        # Query blocks longest first, kv heads innermost; 16-row tiles give many blocks.
        case = RAGGED_CASES[case_idx]
        x = case.inputs()
        out = gpu.ragged_kernel(*x.args(), **case.attn_kwargs, order=order, block_m=16,
                                decode_tile=decode_tile, interpret=self.interpret)
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("variant", [
        dict(prefetch="index"), dict(prefetch="index", num_stages=1),
        dict(decode_prefetch="index"), dict(decode_prefetch="index", prefetch="index"),
    ], ids=["index-ahead", "index-ahead-unpipelined", "decode-index-ahead", "both-index-ahead"])
    @pytest.mark.parametrize("case_idx", [0, 3, 4])  # pages 16 (decodes) / 128 (window, cap) / 16
    def test_ragged_prefetch_variants(self, variant, case_idx):
        # 16-token blocks: many loop iterations, blocks at page edges, fetches past the end.
        case = RAGGED_CASES[case_idx]
        x = case.inputs()
        out = gpu.ragged_kernel(*x.args(), **case.attn_kwargs, block_m=16, block_kv=16,
                                decode_block_kv=16, **variant, interpret=self.interpret)
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("prefetch", ["none", "index"])
    @pytest.mark.parametrize("case_idx", [0, 2])  # ragged lengths 1..300; window + cap
    def test_decode_prefetch_variants(self, prefetch, case_idx):
        case = DECODE_CASES[case_idx]
        x = case.inputs()
        for splits in (1, 4):
            out = gpu.decode_paged_attention(x.q, x.kv_pages, x.kv_lens, x.block_tables,
                                             x.num_seqs, **case.attn_kwargs, block_kv=16,
                                             num_splits=splits, prefetch=prefetch,
                                             interpret=self.interpret)
            assert_close(out, _expected(case, x), dtype=case.dtype,
                         num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.id)
    def test_decode_kernel(self, case):
        x = case.inputs()
        out = gpu.decode_paged_attention(x.q, x.kv_pages, x.kv_lens, x.block_tables, x.num_seqs,
                                         **case.attn_kwargs, interpret=self.interpret)
        assert out.shape == x.q.shape and out.dtype == x.q.dtype
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("num_splits", [1, 2, 8])
    def test_decode_splits(self, num_splits):
        # More splits than blocks leaves some splits empty; the combine must ignore them.
        case = DECODE_CASES[0]
        x = case.inputs()
        out = gpu.decode_paged_attention(x.q, x.kv_pages, x.kv_lens, x.block_tables, x.num_seqs,
                                         **case.attn_kwargs, num_splits=num_splits,
                                         block_kv=32, interpret=self.interpret)
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("case", RAGGED_CASES[:3] + RAGGED_CASES[4:5], ids=lambda c: c.id)
    def test_mixed_two_launch(self, case):
        # Decode kernel on the single-token requests + ragged kernel on the rest.
        x = case.inputs()
        out = gpu.mixed_paged_attention(*x.args(), **case.attn_kwargs, interpret=self.interpret,
                                        decode_kwargs=dict(num_splits=2))
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    @pytest.mark.parametrize("max_q_len", [None, 1])
    def test_dispatch(self, max_q_len):
        case = DECODE_CASES[1]
        x = case.inputs()
        out = kernels_pallas.ragged_paged_attention(
            *x.args(), **case.attn_kwargs, backend="pallas", interpret=self.interpret,
            max_q_len=max_q_len)
        assert_close(out, _expected(case, x), dtype=case.dtype, num_valid_rows=x.num_valid_rows)

    def test_no_live_requests(self):
        case = RAGGED_CASES[0]
        x = dataclasses.replace(case.inputs(), num_seqs=jnp.zeros((1,), jnp.int32), q_lens=())
        for fn in (gpu.ragged_kernel, _decode_via_dispatch, gpu.mixed_paged_attention):
            out = fn(*x.args(), **case.attn_kwargs, interpret=self.interpret)
            assert (jnp.asarray(out, F32) == 0).all()


def _decode_via_dispatch(*args, **kwargs):
    return gpu.ragged_paged_attention(*args, **kwargs, max_q_len=1)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
class TestGpuKernelsCompiled(TestGpuKernelsInterpret):
    interpret = False

    def test_large_decode_and_prefill(self):
        # Shapes of the benchmark's order of magnitude: many pages, split-KV active, bf16.
        for case in (
            Case("gpu-dec-big", (1,) * 16, tuple(range(1000, 17000, 1000)), 8, 4, 128, 16, BF16),
            Case("gpu-prefill-big", (512, 1, 300), (1024, 4000, 300), 8, 4, 128, 64, BF16,
                 num_tokens=1024),
        ):
            x = case.inputs()
            fn = _decode_via_dispatch if case.q_lens[1:] == case.q_lens[:-1] else gpu.ragged_kernel
            out = fn(*x.args(), **case.attn_kwargs, interpret=False)
            assert_close(out, _expected(case, x), dtype=case.dtype,
                         num_valid_rows=x.num_valid_rows)


@pytest.mark.parametrize("kv_dtype", [None, FP8_E4M3], ids=["kv-as-q", "kv-fp8"])
@pytest.mark.parametrize("kernel", ["ragged", "decode"])
def test_export_lowers_for_cuda(kernel, kv_dtype):
    """Both kernels lower to the Triton custom call for ``cuda`` from a CPU-only machine."""
    x = dataclasses.replace(DECODE_CASES[0], kv_dtype=kv_dtype).inputs()
    kwargs = dict(sm_scale=0.1, soft_cap=20.0, sliding_window=64)
    if kernel == "ragged":
        fn = functools.partial(gpu.ragged_kernel, **kwargs)
    else:
        fn = functools.partial(_decode_via_dispatch, **kwargs)
    exported = jax.export.export(
        jax.jit(fn), platforms=("cuda",),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*x.args())
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_lpt_schedule_orders_blocks_by_kv_span():
    # Requests (q_len, kv_len): a chunk with context, a decode, a fresh prompt, another decode,
    # padding. block_q 4: slots (first block of request b = qsl[b] // 4 + b) are req 0 -> 0, 1
    # (spans 16, 20); req 1 -> 3 (decode, 30); req 2 -> 4, 5 (spans 4, 5); req 3 -> 6 (decode, 9).
    kv_lens = jnp.asarray([20, 30, 5, 9, 0], jnp.int32)
    qsl = jnp.asarray([0, 8, 9, 14, 15, 15], jnp.int32)
    num_q_blocks = 16 // 4 + 5
    sched = ragged_attention.lpt_schedule(kv_lens, qsl, jnp.int32(4), block_q=4,
                                          num_q_blocks=num_q_blocks).tolist()
    assert sorted(sched) == list(range(num_q_blocks))  # a permutation of the slots
    # Prefill blocks longest first (1, 0, 5, 4) and decodes longest first (3, 6), the decodes
    # spread evenly among them: keys 1/8, 3/8, 5/8, 7/8 vs 1/4, 3/4.
    assert sched[:6] == [1, 3, 0, 5, 6, 4]
    window = ragged_attention.lpt_schedule(kv_lens, qsl, jnp.int32(4), block_q=4,
                                           num_q_blocks=num_q_blocks, sliding_window=3).tolist()
    # Window spans: prefill slots 0, 1 -> 6 each, 4 -> 4, 5 -> 3; decodes 3, 6 -> 3 each.
    assert window[:6] == [0, 3, 1, 4, 6, 5]


def test_launch_schedule_auto_takes_lpt_only_without_decodes():
    kv_lens = jnp.asarray([20, 30, 5, 0], jnp.int32)
    prefill_only = jnp.asarray([0, 8, 12, 17, 17], jnp.int32)  # q_lens 8, 4, 5
    with_decode = jnp.asarray([0, 8, 9, 14, 14], jnp.int32)  # q_lens 8, 1, 5
    kw = dict(block_q=4, num_q_blocks=8, num_kv_heads=2)
    for qsl in (prefill_only, with_decode):
        lpt = ragged_attention.launch_schedule(kv_lens, qsl, jnp.int32(3), **kw).tolist()
        slots = ragged_attention.lpt_schedule(kv_lens, qsl, jnp.int32(3), block_q=4,
                                              num_q_blocks=8).tolist()
        assert lpt == [s * 2 + h for s in slots for h in (0, 1)]  # heads innermost
        auto = ragged_attention.launch_schedule(kv_lens, qsl, jnp.int32(3), auto=True,
                                                **kw).tolist()
        natural = [s * 2 + h for h in (0, 1) for s in range(8)]  # kv head outermost
        assert auto == (natural if qsl is with_decode else lpt)


def test_wrapper_validates_shapes():
    x = DECODE_CASES[0].inputs()
    with pytest.raises(ValueError, match="kv_pages"):
        gpu.ragged_kernel(x.q, x.kv_pages[:, 0], *x.args()[2:], sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="multiple"):
        gpu.ragged_kernel(x.q[:, :3], *x.args()[1:], sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="query_start_loc"):
        gpu.ragged_kernel(*x.args()[:4], x.query_start_loc[:-1], x.num_seqs, sm_scale=1.0,
                          interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        gpu.decode_paged_attention(x.q, x.kv_pages, x.kv_lens, x.block_tables, x.num_seqs,
                                   sm_scale=1.0, block_kv=48, interpret=True)


def test_fp8_pools_take_their_own_tables_and_f16_matmuls():
    from jaxpage.kernels_pallas.gpu import _common as cm
    from jaxpage.kernels_pallas.gpu import decode_attention as da

    for h in (64, 128, 256):
        assert da.decode_config(h, FP8_E4M3) == da.DECODE_TUNING_FP8[h]
        assert da.decode_config(h, BF16) == da.DECODE_TUNING[h]
        assert ragged_attention.ragged_config(h, FP8_E5M2) == ragged_attention.RAGGED_TUNING_FP8[h]
        assert ragged_attention.ragged_config(h) == ragged_attention.RAGGED_TUNING[h]
    assert da.DECODE_TUNING_FP8[128].block_kv == 2 * da.DECODE_TUNING[128].block_kv
    assert cm.kv_compute_dtype(BF16, FP8_E4M3) == jnp.float16
    assert cm.kv_compute_dtype(F32, FP8_E5M2) == F32  # f32 queries keep f32 products
    assert cm.kv_compute_dtype(BF16, F32) == F32 and cm.kv_compute_dtype(BF16, BF16) == BF16
    # bf16 queries past f16's range saturate instead of becoming inf.
    q = cm.to_compute(jnp.asarray([1e5, -1e6, 3.0], BF16), jnp.float16)
    assert q.dtype == jnp.float16 and bool(jnp.isfinite(q).all()) and float(q[2]) == 3.0


def test_quantize_kv_saturates_fp8():
    x = jnp.asarray([1000.0, -1000.0, 1.0, jnp.nan], F32)
    e4m3 = reference.quantize_kv(x, FP8_E4M3).astype(F32)
    assert e4m3.tolist()[:3] == [448.0, -448.0, 1.0] and bool(jnp.isnan(e4m3[3]))
    assert reference.quantize_kv(x, F32).tolist()[:3] == [1000.0, -1000.0, 1.0]
