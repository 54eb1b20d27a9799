"""The Pallas TPU ragged paged attention kernel against the pure-jnp reference.

On CPU the kernel runs in the TPU interpreter (``pltpu.InterpretParams``: DMAs, semaphores and
VMEM simulated; uninitialized VMEM reads as NaN). The same cases run compiled on a real TPU
(marked ``tpu``). Every case builds fresh random inputs: shuffled block tables, NaN in every
page and page tail past ``kv_len`` (page 0 included), unused block-table entries pointing at
NaN pages and at other requests' pages, NaN in padding query rows, and garbage ``kv_lens``
for requests past ``num_seqs``; any read past ``kv_len`` turns the output NaN.

Tolerances (max abs error, outputs are O(1)): float32 1e-5 in the interpreter and 5e-3
compiled; bfloat16 3e-2 (p is rounded to bf16 before ``p @ v``, like every TPU kernel).

fp8 pools (e4m3fn and e5m2, built with ``reference.quantize_kv``; both types have NaN, so the
poison survives) are checked against the reference on the same fp8 pool, which upcasts it to
float32. Every fp8 value is exact in bf16 and f32, so only compute precision differs and the
tolerance is q's dtype's, as above. Casting q down to fp8 instead of upcasting K/V fails it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage import kernels_pallas
from jaxpage.kernels_pallas import reference
from jaxpage.kernels_pallas.tpu import block_sizes as bsz
from jaxpage.kernels_pallas.tpu import ragged_paged_attention as tpu_rpa

ON_TPU = jax.default_backend() == "tpu"


@dataclasses.dataclass(frozen=True)
class Case:
    """One sampled point of dtype x head_dim x page_size x GQA x lengths x block sizes (and
    pool dtype, for fp8 pools)."""
    dtype: str
    head_dim: int
    page_size: int
    num_kv_heads: int
    group: int  # q heads per kv head
    reqs: tuple  # (q_len, kv_len) per request in use
    blocks: tuple = ()  # kernel block-size overrides, as (name, value) pairs
    kv_dtype: str | None = None  # the pool's dtype when it is not q's (fp8)
    sliding_window: int | None = None
    soft_cap: float | None = None


def _lengths(page_size: int, long: int) -> tuple:
    """Edge lengths 0 / 1 / page-1 / page / page+1 / long, as decodes, chunks and prefills."""
    s = page_size
    return ((0, 0), (1, 1), (1, s - 1), (3, s), (s + 1, s + 1), (1, long), (2, s - 1),
            (37, long), (1, s + 1))


# A sampled product, not the full cross-product: every dtype, head_dim (64, 128), page size
# (16..128), GQA ratio (1, 4, 8) and block-size path (several KV blocks per request, narrow and
# wide query rows, queries spanning query blocks, kv heads split over the grid) appears at
# least twice.
CASES = {
    "f32-h128-s16-g4": Case("float32", 128, 16, 2, 4, _lengths(16, 83),
                            blocks=(("pages_per_block", 2), ("queries_per_block", 16))),
    "bf16-h64-s16-g8": Case("bfloat16", 64, 16, 1, 8, _lengths(16, 70),
                            blocks=(("pages_per_block", 1), ("queries_per_block", 32))),
    "bf16-h128-s32-g1": Case("bfloat16", 128, 32, 4, 1, _lengths(32, 150),
                             blocks=(("kv_heads_per_block", 2),)),
    "f32-h64-s64-g4": Case("float32", 64, 64, 2, 4, _lengths(64, 200)),
    "bf16-h128-s128-g4": Case("bfloat16", 128, 128, 1, 4, _lengths(128, 300),
                              blocks=(("pages_per_block", 1), ("queries_per_block", 64))),
    "f32-h128-s128-g1": Case("float32", 128, 128, 2, 1, ((40, 40), (1, 129), (1, 127), (9, 300)),
                             blocks=(("queries_per_block", 16),)),
    "f32-h64-s32-g8-window-softcap": Case(
        "float32", 64, 32, 1, 8, _lengths(32, 100), blocks=(("pages_per_block", 1),),
        sliding_window=20, soft_cap=5.0),
    "bf16-h64-s64-g1-window": Case("bfloat16", 64, 64, 2, 1, _lengths(64, 150),
                                   blocks=(("kv_heads_per_block", 1),), sliding_window=70),
    # fp8 pools, each type under bf16 and f32 queries; S = 16 is half an fp8 sublane tile.
    "bf16-fp8e4m3-h128-s16-g4": Case("bfloat16", 128, 16, 2, 4, _lengths(16, 83),
                                     blocks=(("pages_per_block", 2), ("queries_per_block", 16)),
                                     kv_dtype="float8_e4m3fn"),
    "bf16-fp8e5m2-h64-s32-g8-window": Case("bfloat16", 64, 32, 1, 8, _lengths(32, 100),
                                           blocks=(("pages_per_block", 1),),
                                           sliding_window=40, kv_dtype="float8_e5m2"),
    "f32-fp8e4m3-h128-s64-g1": Case("float32", 128, 64, 2, 1, _lengths(64, 150),
                                    blocks=(("kv_heads_per_block", 1),),
                                    kv_dtype="float8_e4m3fn"),
    "f32-fp8e5m2-h64-s16-g4-softcap": Case("float32", 64, 16, 2, 4, _lengths(16, 70),
                                           blocks=(("queries_per_block", 16),), soft_cap=5.0,
                                           kv_dtype="float8_e5m2"),
}


def make_inputs(case: Case, seed: int, num_pad_rows: int = 3, num_idle_reqs: int = 2):
    """Random inputs for ``case``; returns the kernel's positional args."""
    rng = np.random.default_rng(seed)
    s, kh, h = case.page_size, case.num_kv_heads, case.head_dim
    order = rng.permutation(len(case.reqs))  # decodes and prefills interleaved differently
    reqs = [case.reqs[i] for i in order]
    num_seqs = len(reqs)
    num_reqs = num_seqs + num_idle_reqs
    pages_needed = [-(-kv // s) for _, kv in reqs]
    pages_per_seq = max(pages_needed) + 1
    num_pages = sum(pages_needed) + 5
    pool = np.full((num_pages, 2, kh, s, h), np.nan, np.float32)
    free = rng.permutation(np.arange(1, num_pages))  # page 0 stays NaN: the null page
    block_tables = rng.integers(0, num_pages, (num_reqs, pages_per_seq)).astype(np.int32)
    used = 0
    for i, ((_, kv_len), n) in enumerate(zip(reqs, pages_needed)):
        pages = free[used:used + n]
        used += n
        block_tables[i, :n] = pages
        for j, page in enumerate(pages):
            valid = min(s, kv_len - j * s)  # the tail of the last page stays NaN
            pool[page, :, :, :valid] = rng.standard_normal((2, kh, valid, h))
    q_lens = [q for q, _ in reqs]
    query_start_loc = np.zeros(num_reqs + 1, np.int32)
    query_start_loc[1:num_seqs + 1] = np.cumsum(q_lens)
    query_start_loc[num_seqs + 1:] = query_start_loc[num_seqs]
    num_tokens = int(query_start_loc[num_seqs]) + num_pad_rows
    q = rng.standard_normal((num_tokens, kh * case.group, h)).astype(np.float32)
    q[num_tokens - num_pad_rows:] = np.nan
    kv_lens = np.full(num_reqs, 10**6, np.int32)  # idle requests: garbage the kernel must ignore
    kv_lens[:num_seqs] = [kv for _, kv in reqs]
    dtype = jnp.dtype(case.dtype)
    pool = reference.quantize_kv(jnp.asarray(pool), case.kv_dtype or dtype)  # NaN stays NaN
    return (jnp.asarray(q, dtype), pool, jnp.asarray(kv_lens),
            jnp.asarray(block_tables), jnp.asarray(query_start_loc),
            jnp.asarray([num_seqs], jnp.int32))


def attention_kwargs(case: Case) -> dict:
    return dict(sm_scale=case.head_dim ** -0.5, soft_cap=case.soft_cap,
                sliding_window=case.sliding_window)


def assert_close(out, ref, dtype, compiled: bool):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any(), "NaN in the output: the kernel read past kv_len"
    tol = {"float32": 5e-3 if compiled else 1e-5, "bfloat16": 3e-2}[dtype]
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


class TpuKernelCases:
    """Kernel-vs-reference cases; subclasses choose interpreted or compiled."""
    interpret = None

    def run(self, *args, **kwargs):
        return tpu_rpa.ragged_paged_attention(*args, interpret=self.interpret, **kwargs)

    @pytest.mark.parametrize("name", list(CASES))
    def test_matches_reference(self, name, capfd):
        case = CASES[name]
        args = make_inputs(case, seed=sum(map(ord, name)))
        kw = attention_kwargs(case)
        ref = reference.ragged_paged_attention(*args, **kw)
        assert np.isfinite(np.asarray(ref, np.float32)).all()  # the oracle ignores the poison
        out = self.run(*args, **kw, **dict(case.blocks))
        assert out.shape == args[0].shape and out.dtype == args[0].dtype
        assert_close(out, ref, case.dtype, compiled=not self.interpret)
        # The interpreter's race detector prints (it does not raise) when a DMA into a slot
        # overlaps a read of it, e.g. a prefetch into the buffer being computed on.
        assert "RACE DETECTED" not in capfd.readouterr().out

    @pytest.mark.parametrize("kv_dtype", [None, "float8_e4m3fn", "float8_e5m2"])
    def test_poison_is_visible(self, kv_dtype):
        """A kernel told to read one key past the data must produce NaN: the tests bite (fp8
        pools included: the poison survives quantize_kv and the upcast)."""
        case = Case("float32", 128, 16, 1, 4, ((1, 5), (1, 16), (1, 7)), kv_dtype=kv_dtype)
        q, pool, kv_lens, bt, cu, num_seqs = make_inputs(case, seed=7, num_pad_rows=0,
                                                         num_idle_reqs=0)
        out = self.run(q, pool, kv_lens + 1, bt, cu, num_seqs, sm_scale=0.1)
        assert np.isnan(np.asarray(out)).all()

    def test_no_requests_in_use(self):
        case = CASES["f32-h128-s16-g4"]
        q, pool, kv_lens, bt, cu, _ = make_inputs(case, seed=3)
        out = self.run(q, pool, kv_lens, bt, cu, jnp.int32(0), sm_scale=0.1)  # () num_seqs
        assert (np.asarray(out) == 0).all()


class TestTpuKernelInterpret(TpuKernelCases):
    # Eager DMAs land as soon as they start, so a prefetch into the wrong slot corrupts data
    # the kernel still reads; the race detector also reports such overlaps.
    interpret = tpu_rpa.interpret_params(dma_execution_mode="eager", detect_races=True)


@pytest.mark.tpu
@pytest.mark.skipif(not ON_TPU, reason="needs a Cloud TPU")
class TestTpuKernelCompiled(TpuKernelCases):
    interpret = False


# name -> (q dtype, pool dtype, H, S, K, G, kernel options)
EXPORT_CASES = {
    "bf16-h128-s16-k8g4": (jnp.bfloat16, jnp.bfloat16, 128, 16, 8, 4, {}),
    "f32-h64-s128-k2g1-split-heads": (jnp.float32, jnp.float32, 64, 128, 2, 1,
                                      dict(kv_heads_per_block=1)),
    "bf16-h64-s32-k1g8-window-softcap": (
        jnp.bfloat16, jnp.bfloat16, 64, 32, 1, 8,
        dict(queries_per_block=32, sliding_window=64, soft_cap=30.0)),
    "bf16-fp8e4m3-h128-s16-k8g4": (jnp.bfloat16, jnp.float8_e4m3fn, 128, 16, 8, 4, {}),
    "f32-fp8e5m2-h64-s32-k2g4-split-heads": (jnp.float32, jnp.float8_e5m2, 64, 32, 2, 4,
                                             dict(kv_heads_per_block=1)),
}


def _export_args(q_dtype, kv_dtype, h, s, kh, g):
    t, r, pmax, p = 256, 16, 8, 200
    return (jax.ShapeDtypeStruct((t, kh * g, h), q_dtype),
            jax.ShapeDtypeStruct((p, 2, kh, s, h), kv_dtype),
            jax.ShapeDtypeStruct((r,), jnp.int32), jax.ShapeDtypeStruct((r, pmax), jnp.int32),
            jax.ShapeDtypeStruct((r + 1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_lowers_for_tpu(name):
    """Lowers through Pallas -> Mosaic for the tpu platform on CPU (Mosaic's own layout
    passes run only inside libtpu, so this cannot prove the kernel compiles on a chip)."""
    q_dtype, kv_dtype, h, s, kh, g, extra = EXPORT_CASES[name]
    args = _export_args(q_dtype, kv_dtype, h, s, kh, g)
    f = functools.partial(tpu_rpa.ragged_paged_attention, sm_scale=h ** -0.5, **extra)
    exported = jax.export.export(jax.jit(f), platforms=("tpu",))(*args)
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in exported.mlir_module()
    assert exported.out_avals[0].shape == args[0].shape
    assert exported.out_avals[0].dtype == q_dtype


def _eqns(jaxpr):
    """Every equation of a (closed) jaxpr, those of nested jaxprs (the kernel, loops) too."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    yield from _eqns(sub)


def _float_dtypes(atoms):
    """Float dtypes among the operands (refs included; semaphores and indices are not)."""
    dtypes = {getattr(a.aval, "dtype", None) for a in atoms}
    return {d for d in dtypes if isinstance(d, np.dtype) and jnp.issubdtype(d, jnp.floating)}


@pytest.mark.parametrize("q_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("kv_dtype", reference.FP8_DTYPES, ids=["fp8e4m3", "fp8e5m2"])
def test_fp8_pool_moves_as_fp8_and_multiplies_in_q_dtype(q_dtype, kv_dtype):
    """What the numbers cannot show: the pool reaches VMEM as fp8 (no upcast copy of it in
    HBM, half the DMA bytes of bf16) and no matmul operand is fp8 (q is never cast down)."""
    args = _export_args(q_dtype, kv_dtype, 128, 16, 2, 4)
    f = functools.partial(tpu_rpa.ragged_paged_attention, sm_scale=0.1)
    eqns = list(_eqns(jax.make_jaxpr(f)(*args)))
    dmas = [e for e in eqns if e.primitive.name == "dma_start"]
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert dmas and dots
    assert all(_float_dtypes(e.invars) == {kv_dtype} for e in dmas)
    assert all(_float_dtypes(e.invars) == {jnp.dtype(q_dtype)} for e in dots)


def _shapes(**over):
    base = dict(q=(32, 8, 128), kv=(10, 2, 2, 16, 128), kv_lens=(4,), bt=(4, 3), cu=(5,),
                num_seqs=(1,))
    base.update(over)
    return base


@pytest.mark.parametrize("over, match", [
    (dict(q=(32, 8, 64)), "head_dim"),
    (dict(q=(32, 7, 128)), "multiple"),
    (dict(kv=(10, 2, 16, 128)), "kv_pages"),
    (dict(kv_lens=(3,)), "kv_lens"),
    (dict(cu=(4,)), "query_start_loc"),
    (dict(num_seqs=(2,)), "num_seqs"),
])
def test_rejects_bad_shapes(over, match):
    sh = _shapes(**over)
    args = (jnp.zeros(sh["q"]), jnp.zeros(sh["kv"]), jnp.zeros(sh["kv_lens"], jnp.int32),
            jnp.zeros(sh["bt"], jnp.int32), jnp.zeros(sh["cu"], jnp.int32),
            jnp.zeros(sh["num_seqs"], jnp.int32))
    with pytest.raises(ValueError, match=match):
        tpu_rpa.ragged_paged_attention(*args, sm_scale=1.0, interpret=True)


def test_rejects_bad_options():
    sh = _shapes()
    args = (jnp.zeros(sh["q"]), jnp.zeros(sh["kv"]), jnp.zeros(sh["kv_lens"], jnp.int32),
            jnp.zeros(sh["bt"], jnp.int32), jnp.zeros(sh["cu"], jnp.int32),
            jnp.zeros(sh["num_seqs"], jnp.int32))
    with pytest.raises(ValueError, match="sliding_window"):
        tpu_rpa.ragged_paged_attention(*args, sm_scale=1.0, sliding_window=0, interpret=True)
    with pytest.raises(ValueError, match="queries_per_block"):
        tpu_rpa.ragged_paged_attention(*args, sm_scale=1.0, queries_per_block=24, interpret=True)
    with pytest.raises(ValueError, match="int32"):
        tpu_rpa.ragged_paged_attention(args[0], args[1], args[2].astype(jnp.float32), *args[3:],
                                       sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="fp8"):  # only the pool may be fp8
        tpu_rpa.ragged_paged_attention(args[0].astype(jnp.float8_e4m3fn),
                                       args[1].astype(jnp.float8_e4m3fn), *args[2:],
                                       sm_scale=1.0, interpret=True)


@pytest.mark.parametrize("dtype, kv_dtype", [("float32", None), ("bfloat16", None),
                                             ("bfloat16", "float8_e4m3fn"),
                                             ("float32", "float8_e5m2")])
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(32, 8, 128), (8, 1, 64),
                                                                 (64, 64, 128), (16, 2, 256)])
@pytest.mark.parametrize("page_size", [16, 32, 64, 128])
@pytest.mark.parametrize("num_tokens", [1, 16, 256, 8192])
def test_block_sizes_fit_vmem(dtype, kv_dtype, num_q_heads, num_kv_heads, head_dim, page_size,
                              num_tokens):
    kv_dtype = kv_dtype or dtype
    bs = bsz.fit_block_sizes(num_tokens=num_tokens, num_q_heads=num_q_heads,
                             num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                             pages_per_seq=512, q_dtype=dtype, kv_dtype=kv_dtype)
    tile = bsz.sublane_tile(dtype)  # an fp8 pool is upcast first: q's tile, not fp8's 32 rows
    assert bsz.query_tile(dtype, kv_dtype) == tile
    assert bs.queries_per_block % tile == 0
    assert bs.queries_per_block & (bs.queries_per_block - 1) == 0
    assert num_kv_heads % bs.kv_heads_per_block == 0
    assert bs.pages_per_block >= 1
    need = bsz.vmem_bytes(bs, group=num_q_heads // num_kv_heads, page_size=page_size,
                          head_dim=head_dim, q_itemsize=jnp.dtype(dtype).itemsize,
                          kv_itemsize=jnp.dtype(kv_dtype).itemsize)
    assert need <= bsz.VMEM_BUDGET_BYTES


def test_block_sizes_fp8_pool():
    """One-byte pools: 32-row sublane tiles (a 16-token page is padded to one), half the KV
    buffer bytes of bf16 at S >= 32, and q rows tiled by q's dtype."""
    assert bsz.sublane_tile("float8_e4m3fn") == bsz.sublane_tile("float8_e5m2") == 32
    assert bsz.query_tile("bfloat16", "float8_e4m3fn") == 16
    assert bsz.query_tile("float32", "float8_e5m2") == 8
    assert bsz.query_tile("float32", "bfloat16") == 16  # q is cast to a bf16 pool's dtype
    bs = bsz.BlockSizes(pages_per_block=8, queries_per_block=64, kv_heads_per_block=8)

    def kv_part(page_size, kv_itemsize):  # the estimate's dependence on the pool's dtype
        kw = dict(group=4, page_size=page_size, head_dim=128, q_itemsize=2)
        return (bsz.vmem_bytes(bs, kv_itemsize=kv_itemsize, **kw)
                - bsz.vmem_bytes(bs, kv_itemsize=2, **kw))

    upcast = 2 * 8 * 16 * 128 * (4 + 2)  # one head's K and V of L = 8 * 16 keys, f32 + bf16
    assert kv_part(16, 1) == upcast  # each 16-row page padded to 32 fp8 rows: no saving
    kv_buf_bf16 = 2 * 2 * 8 * 8 * 32 * 128 * 2  # slots x K/V x heads x pages x S x H x bytes
    assert kv_part(32, 1) == -kv_buf_bf16 // 2 + 2 * upcast


def test_public_op_routes_pallas_to_tpu_kernel(monkeypatch):
    """``backend="pallas"`` on a TPU host reaches this kernel (faked host, interpreted)."""
    case = CASES["f32-h128-s16-g4"]
    args = make_inputs(case, seed=11)
    calls = []
    real = tpu_rpa.ragged_paged_attention

    def spy(*a, **kw):
        calls.append(kw.get("interpret"))
        return real(*a, **kw)

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(tpu_rpa, "ragged_paged_attention", spy)
    out = kernels_pallas.ragged_paged_attention(*args, sm_scale=0.1, backend="pallas",
                                                interpret=True)
    assert calls, "backend='pallas' on TPU did not call the TPU kernel"
    ref = reference.ragged_paged_attention(*args, sm_scale=0.1)
    assert_close(out, ref, case.dtype, compiled=False)
