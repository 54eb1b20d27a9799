"""Ragged paged attention as a Pallas Mosaic TPU kernel (mixed prefill + decode, GQA).

Same contract as ``kernels_pallas/reference.py``; the pool keeps the shared layout
``(P, 2, K, S, H)``, so one page of K and V for all heads is one contiguous DMA.

Grid and data movement::

    grid = (K // KB, ceil(T / TQ))      both "parallel": no state crosses grid steps

    one step (kv-head block hb, query block qi) owns q rows [qi*TQ, qi*TQ + TQ):

      rows  |..req 3 (tail of a chunk)..|r4|r5|r6|.....req 7 (head of a chunk).....|
            ^ qi*TQ  (first request scalar-prefetched: first_seq[qi])       qi*TQ+TQ ^
      for each request r with rows here:
        for each KV block of r that those rows can see (causal and window cuts):
          DMA the block's pages, block_tables[r, p0 : p0+NB], HBM -> VMEM slot ^= 1;
          the next (request, block) is started before this one is waited on
          for each kv head: online-softmax update of r's rows only
            narrow: r's rows fit one sublane tile (decodes)  -> G * tile rows of work
            wide:   otherwise                                -> G * TQ rows, masked to r

Queries are regrouped by the wrapper to (K, G, T, H) so that the rows of one kv head form a
plain (G * TQ, H) matrix in VMEM (row i <-> q head g = i // TQ, token t = i % TQ): GQA of
any ratio needs no in-kernel relayout, and TQ being a multiple of the sublane tile keeps
every reshape tile-aligned. head_dim 64 stays 64 in HBM and in VMEM (Mosaic pads the lane
dim of the VMEM tiles, the matmuls contract over 64); the pool itself is not padded, since
that would copy the whole pool per call.

Nothing past ``kv_len`` reaches the output: pages past the visible range are never copied;
scores outside the mask are replaced (``where``) by -inf; V rows past the visible range are
zeroed before ``p @ v`` because 0 * NaN is NaN.

fp8 pools (``reference.FP8_DTYPES``): pages travel HBM -> VMEM and sit in VMEM as fp8 (half
the bytes of bf16), and K/V are upcast after the load to ``reference.compute_dtype`` (q's
dtype) for both matmuls; q itself is never cast down to the pool's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxpage.kernels_pallas import reference
from jaxpage.kernels_pallas.tpu import block_sizes as bsz
from jaxpage.kernels_pallas.validation import check_paged_inputs

LANES = bsz.LANES
# Finite start for the running max: exp(m_prev - m_next) then never sees (-inf) - (-inf),
# while masked scores are -inf, so rows with nothing visible yet get p = 0 and alpha = 1.
M_INIT = -1e30
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: q @ k.T


def interpret_params(**kwargs):
    """``pltpu.InterpretParams`` (jax >= 0.7), or its older name ``TPUInterpretParams``."""
    cls = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams")
    return cls(**kwargs)


def _lanes(x, n: int):
    """Widens a lane-replicated (..., 128) array to (..., n) lanes."""
    if n == LANES:
        return x
    if n < LANES:
        return x[..., :n]
    reps, rem = divmod(n, LANES)
    return jnp.concatenate([x] * reps + ([x[..., :rem]] if rem else []), axis=-1)


def _upcast(x, dtype):
    """``x`` as ``dtype``; fp8 goes through float32, since Mosaic does not convert between
    arbitrary dtypes (fp8 -> bf16 directly may not lower). Exact: every fp8 value is a bf16."""
    if reference.is_fp8(x.dtype):
        x = x.astype(jnp.float32)
    return x.astype(dtype)


def _kernel(
    # Scalar prefetch (SMEM).
    first_seq_ref,  # (num_q_blocks,) first request with a row in each query block
    num_seqs_ref,  # (1,)
    kv_lens_ref,  # (R,)
    block_tables_ref,  # (R * Pmax,) flattened, row-major
    cu_ref,  # (R + 1,) query_start_loc
    # Inputs.
    q_ref,  # VMEM (KB, G, TQ, H)
    kv_hbm_ref,  # HBM (P, 2, K, S, H)
    # Output.
    o_ref,  # VMEM (KB, G, TQ, H)
    # Scratch.
    kv_buf,  # VMEM (2, 2, KB, NB, S, H): [slot, k/v, kv head, page, token, lane]
    sems,  # DMA semaphores (2,), one per slot
    m_ref,  # VMEM (KB, G, TQ, 128) f32 running max, lane-replicated
    l_ref,  # VMEM (KB, G, TQ, 128) f32 running denominator, lane-replicated
    acc_ref,  # VMEM (KB, G, TQ, H) f32 running numerator
    *,
    sm_scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    q_tile: int,
):
    kvb, group, tq, head_dim = q_ref.shape
    _, _, num_kv_heads, page_size, _ = kv_hbm_ref.shape
    nb = kv_buf.shape[3]
    keys = nb * page_size
    num_reqs = kv_lens_ref.shape[0]
    pages_per_seq = block_tables_ref.shape[0] // num_reqs
    hb, qi = pl.program_id(0), pl.program_id(1)
    blk_start = qi * tq
    blk_end = blk_start + tq
    num_seqs = num_seqs_ref[0]
    # Both matmuls run in this dtype: the pool's, or q's for an fp8 pool (K/V upcast after the
    # VMEM load, so the DMAs move one byte per value).
    cdt = reference.compute_dtype(q_ref.dtype, kv_buf.dtype)
    # f32 operands: full-precision MXU passes (the default may round operands to bf16).
    precision = lax.Precision.HIGHEST if cdt == jnp.float32 else None

    m_ref[...] = jnp.full(m_ref.shape, M_INIT, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def seq_info(r):
        """Scalars describing request r's rows in this block and the keys they can see."""
        r = jnp.minimum(r, num_reqs - 1)  # callers probe one past the last request
        q_start, q_end = cu_ref[r], cu_ref[r + 1]
        kv_len = jnp.minimum(kv_lens_ref[r], pages_per_seq * page_size)
        row_lo = jnp.maximum(q_start, blk_start)  # absolute rows [row_lo, row_hi) of r here
        row_hi = jnp.minimum(q_end, blk_end)
        ctx0 = kv_lens_ref[r] - (q_end - q_start) - q_start  # position of absolute row t: ctx0 + t
        kv_hi = jnp.maximum(jnp.minimum(ctx0 + row_hi, kv_len), 0)  # keys [kv_lo, kv_hi) visible
        kv_lo = jnp.int32(0)
        if sliding_window is not None:
            kv_lo = jnp.maximum(ctx0 + row_lo - sliding_window + 1, 0)
        page_lo = lax.div(kv_lo, page_size)
        page_hi = lax.div(kv_hi + page_size - 1, page_size)
        has_work = (row_hi > row_lo) & (kv_hi > kv_lo)
        num_blocks = jnp.where(has_work, lax.div(page_hi - page_lo + nb - 1, nb), 0)
        return dict(r=r, row_lo=row_lo, row_hi=row_hi, ctx0=ctx0, kv_hi=kv_hi,
                    page_lo=page_lo, page_hi=page_hi, num_blocks=num_blocks)

    def in_block(r):
        return (r < num_seqs) & (cu_ref[jnp.minimum(r, num_reqs - 1)] < blk_end)

    def skip_idle(r):
        """First request >= r in this block that has KV blocks to visit."""
        return lax.while_loop(
            lambda r: in_block(r) & (seq_info(r)["num_blocks"] == 0), lambda r: r + 1, r)

    def page_copies(info, b, slot):
        """(number of pages, i -> DMA descriptor) for KV block b of a request."""
        first_page = info["page_lo"] + b * nb
        num_pages = jnp.minimum(nb, info["page_hi"] - first_page)

        def copy(i):
            page = block_tables_ref[info["r"] * pages_per_seq + first_page + i]
            if kvb == num_kv_heads:
                src = kv_hbm_ref.at[page]  # (2, K, S, H): one contiguous run of HBM
            else:
                src = kv_hbm_ref.at[page, :, pl.ds(hb * kvb, kvb)]  # (2, KB, S, H)
            return pltpu.make_async_copy(src, kv_buf.at[slot, :, :, i], sems.at[slot])

        return num_pages, copy

    def start_block(r, b, slot):
        num_pages, copy = page_copies(seq_info(r), b, slot)
        lax.fori_loop(0, num_pages, lambda i, c: (copy(i).start(), c)[1], 0)

    def wait_block(info, b, slot):
        num_pages, copy = page_copies(info, b, slot)
        lax.fori_loop(0, num_pages, lambda i, c: (copy(i).wait(), c)[1], 0)

    def attend(info, b, slot, row_off, nrows):
        """Online-softmax update of rows [row_off, row_off + nrows) of the block, every head."""
        rows = group * nrows
        rsl = pl.ds(row_off, nrows) if nrows != tq else slice(None)
        kv_start = (info["page_lo"] + b * nb) * page_size
        # Row i of the (rows, keys) tile is token t = i % nrows of the block slice.
        t = lax.broadcasted_iota(jnp.int32, (rows, keys), 0) & (nrows - 1)  # nrows: power of 2
        j = lax.broadcasted_iota(jnp.int32, (rows, keys), 1)
        abs0 = blk_start + row_off  # absolute row of t = 0
        diag = info["ctx0"] + abs0 - kv_start  # key j is visible to token t iff j <= t + diag
        mask = (t >= info["row_lo"] - abs0) & (t < info["row_hi"] - abs0) & (j <= t + diag)
        if sliding_window is not None:
            mask &= j > t + diag - sliding_window

        def head(k, carry):
            q = q_ref[k, :, rsl, :].reshape(rows, head_dim).astype(cdt)  # (G*n, H)
            # Upcast before the reshape: merging (NB, S, H) -> (L, H) is tile-aligned in the
            # compute dtype, not in fp8 (32-row tiles) when S = 16.
            kk = _upcast(kv_buf[slot, 0, k], cdt).reshape(keys, head_dim)  # (L, H)
            vv = _upcast(kv_buf[slot, 1, k], cdt).reshape(keys, head_dim)  # (L, H)
            s = lax.dot_general(q, kk, _NT, precision=precision,
                                preferred_element_type=jnp.float32) * sm_scale  # (G*n, L)
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, -jnp.inf)
            m_prev = m_ref[k, :, rsl, :].reshape(rows, LANES)  # (G*n, 128)
            l_prev = l_ref[k, :, rsl, :].reshape(rows, LANES)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (G*n, 128)
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(s - _lanes(m_next, keys))  # (G*n, L); masked -> exp(-inf) = 0
            l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = jnp.dot(p.astype(cdt), vv, precision=precision,
                         preferred_element_type=jnp.float32)  # (G*n, H)
            acc = acc_ref[k, :, rsl, :].reshape(rows, head_dim)
            acc_ref[k, :, rsl, :] = (_lanes(alpha, head_dim) * acc + pv).reshape(
                group, nrows, head_dim)
            m_ref[k, :, rsl, :] = m_next.reshape(group, nrows, LANES)
            l_ref[k, :, rsl, :] = l_next.reshape(group, nrows, LANES)
            return carry

        lax.fori_loop(0, kvb, head, 0)

    def zero_stale_values(info, b, slot):
        """Zeroes V rows past the visible keys (stale VMEM, or stale pool data in the last
        page): p is 0 there, but 0 * NaN would still poison p @ v. Last block only."""
        num_ok = info["kv_hi"] - (info["page_lo"] + b * nb) * page_size

        @pl.when(num_ok < keys)
        def _():
            shape = (nb, page_size, head_dim)
            pos = (lax.broadcasted_iota(jnp.int32, shape, 0) * page_size
                   + lax.broadcasted_iota(jnp.int32, shape, 1))
            ok = pos < num_ok

            def head(k, carry):
                # In f32: selects on packed 16/8-bit vregs are not supported on every chip. The
                # round trip is exact, fp8 included (every fp8 value is an f32, 0.0 is an fp8),
                # and the NaN of a poisoned fp8 slot is replaced, not converted.
                v = _upcast(kv_buf[slot, 1, k], jnp.float32)  # (NB, S, H)
                kv_buf[slot, 1, k] = jnp.where(ok, v, 0.0).astype(kv_buf.dtype)
                return carry

            lax.fori_loop(0, kvb, head, 0)

    def compute_block(info, b, slot):
        zero_stale_values(info, b, slot)
        if q_tile >= tq:
            attend(info, b, slot, 0, tq)
            return
        rel_lo = info["row_lo"] - blk_start
        rel_hi = info["row_hi"] - blk_start
        tile0 = lax.div(rel_lo, q_tile)
        narrow = tile0 == lax.div(rel_hi - 1, q_tile)

        @pl.when(narrow)
        def _():
            attend(info, b, slot, pl.multiple_of(tile0 * q_tile, q_tile), q_tile)

        @pl.when(jnp.logical_not(narrow))
        def _():
            attend(info, b, slot, 0, tq)

    r0 = skip_idle(first_seq_ref[qi])

    @pl.when(in_block(r0))
    def _():
        start_block(r0, 0, 0)

    def step(carry):
        r, b, slot = carry
        info = seq_info(r)
        last = b + 1 >= info["num_blocks"]
        r_next = skip_idle(jnp.where(last, r + 1, r))
        b_next = jnp.where(last, 0, b + 1)

        @pl.when(in_block(r_next))
        def _():
            start_block(r_next, b_next, 1 - slot)

        wait_block(info, b, slot)
        compute_block(info, b, slot)
        return r_next, b_next, 1 - slot

    lax.while_loop(lambda c: in_block(c[0]), step, (r0, jnp.int32(0), jnp.int32(0)))

    def finish(k, carry):
        l = _lanes(l_ref[k], head_dim)  # (G, TQ, H)
        out = jnp.where(l == 0.0, 0.0, acc_ref[k] / l)  # rows no request owns -> 0
        o_ref[k] = out.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, kvb, finish, 0)


def _validate(q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, soft_cap,
              sliding_window):
    num_reqs = check_paged_inputs(q, kv_pages, kv_lens, block_tables, int32_only=True)[5]
    if reference.is_fp8(q.dtype):
        raise ValueError(f"q must not be fp8 (only the pool may be), got {q.dtype}")
    if query_start_loc.shape != (num_reqs + 1,):
        raise ValueError(f"query_start_loc must be ({num_reqs + 1},), got "
                         f"{query_start_loc.shape}")
    if jnp.shape(num_seqs) not in ((), (1,)):
        raise ValueError(f"num_seqs must be a scalar or (1,), got {jnp.shape(num_seqs)}")
    for name, x in (("query_start_loc", query_start_loc), ("num_seqs", num_seqs)):
        if jnp.result_type(x) != jnp.int32:
            raise ValueError(f"{name} must be int32, got {jnp.result_type(x)}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be positive, got {soft_cap}")
    if sliding_window is not None and not sliding_window > 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "soft_cap", "sliding_window", "pages_per_block",
                     "queries_per_block", "kv_heads_per_block", "vmem_limit_bytes",
                     "interpret"))
def ragged_paged_attention(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    pages_per_block: int | None = None,
    queries_per_block: int | None = None,
    kv_heads_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    interpret=False,
) -> jax.Array:
    """Ragged paged attention on TPU; the contract is ``reference.ragged_paged_attention``'s.

    Args:
        q: (T, N, H) queries, requests packed back to back.
        kv_pages: (P, 2, K, S, H) this layer's pool; fp8 (``reference.FP8_DTYPES``) is read
            as stored and upcast to q's dtype in VMEM.
        kv_lens: (R,) int32 context length per request, new tokens included.
        block_tables: (R, Pmax) int32 page ids per request.
        query_start_loc: (R + 1,) int32 row offsets of each request's queries.
        num_seqs: () or (1,) int32 requests in use.
        sm_scale: softmax scale.
        soft_cap: optional tanh logit cap.
        sliding_window: optional window; keys at positions in (pos - window, pos] are seen.
        pages_per_block, queries_per_block, kv_heads_per_block: override ``block_sizes``.
        vmem_limit_bytes: scoped VMEM limit; by default raised only when the estimate needs it.
        interpret: False, True or ``pltpu.InterpretParams`` (True means default params): run
            the kernel in the TPU interpreter, on any backend.

    Returns:
        (T, N, H) in q's dtype; rows past ``query_start_loc[num_seqs]`` are zero.
    """
    _validate(q, kv_pages, kv_lens, block_tables, query_start_loc, num_seqs, soft_cap,
              sliding_window)
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return jnp.zeros_like(q)
    _, _, num_kv_heads, page_size, _ = kv_pages.shape
    num_reqs, pages_per_seq = block_tables.shape
    group = num_q_heads // num_kv_heads

    bs = bsz.fit_block_sizes(
        num_tokens=num_tokens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, page_size=page_size, pages_per_seq=pages_per_seq,
        q_dtype=q.dtype, kv_dtype=kv_pages.dtype, pages_per_block=pages_per_block,
        queries_per_block=queries_per_block, kv_heads_per_block=kv_heads_per_block)
    tq, nb, kvb = bs.queries_per_block, bs.pages_per_block, bs.kv_heads_per_block
    q_tile = bsz.query_tile(q.dtype, kv_pages.dtype)
    if tq % q_tile or tq & (tq - 1):
        raise ValueError(f"queries_per_block must be a power of two and a multiple of {q_tile}, "
                         f"got {tq}")
    if num_kv_heads % kvb:
        raise ValueError(f"kv_heads_per_block {kvb} does not divide num_kv_heads {num_kv_heads}")
    num_q_blocks = -(-num_tokens // tq)
    padded_tokens = num_q_blocks * tq

    num_seqs = jnp.minimum(jnp.reshape(num_seqs, (1,)), num_reqs)
    # First request with a row in each query block: #requests in use that end at or before
    # the block start (a masked count, robust to whatever the unused tail of cu holds).
    block_starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * tq  # (num_q_blocks,)
    in_use = jnp.arange(num_reqs) < num_seqs[0]  # (R,)
    ends_before = (query_start_loc[1:][None, :] <= block_starts[:, None]) & in_use[None, :]
    first_seq = jnp.sum(ends_before, axis=1, dtype=jnp.int32)  # (num_q_blocks,)

    # (T, N, H) -> (K, G, Tp, H): the rows of one kv head become one matrix per block.
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, padded_tokens - num_tokens), (0, 0)))

    q_spec = pl.BlockSpec((kvb, group, tq, head_dim), lambda h, i, *_: (h, 0, i, 0))
    scratch = [
        pltpu.VMEM((2, 2, kvb, nb, page_size, head_dim), kv_pages.dtype),
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.VMEM((kvb, group, tq, LANES), jnp.float32),
        pltpu.VMEM((kvb, group, tq, LANES), jnp.float32),
        pltpu.VMEM((kvb, group, tq, head_dim), jnp.float32),
    ]
    if vmem_limit_bytes is None:
        need = bsz.vmem_bytes(bs, group=group, page_size=page_size, head_dim=head_dim,
                              q_itemsize=q.dtype.itemsize, kv_itemsize=kv_pages.dtype.itemsize)
        if need > bsz.VMEM_BUDGET_BYTES:
            vmem_limit_bytes = int(need * 1.25)
    if interpret is True:
        interpret = interpret_params()

    kernel = pl.pallas_call(
        functools.partial(_kernel, sm_scale=float(sm_scale), soft_cap=soft_cap,
                          sliding_window=sliding_window, q_tile=q_tile),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_kv_heads // kvb, num_q_blocks),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=scratch),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=vmem_limit_bytes),
        interpret=interpret,
        name="jaxpage_ragged_paged_attention",
    )
    out = kernel(first_seq, num_seqs.astype(jnp.int32), kv_lens, block_tables.reshape(-1),
                 query_start_loc, qg, kv_pages)  # (K, G, Tp, H)
    out = out[:, :, :num_tokens].transpose(2, 0, 1, 3)  # (T, K, G, H)
    return out.reshape(num_tokens, num_q_heads, head_dim)

