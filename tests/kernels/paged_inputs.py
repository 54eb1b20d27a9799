"""Random ragged paged-attention inputs and a naive float64 oracle, shared by every kernel test.

Backend-agnostic on purpose (the GPU and TPU kernel tests both import it). The pool is built to
catch any read past ``kv_len``: every slot that holds no live token is NaN — free pages, the
tail of each request's last page, and the null page 0 that padding tokens write to — block
tables are shuffled, and their unused entries point at random pages (NaN or other requests').
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxpage.kernels_pallas import reference


@dataclasses.dataclass
class PagedInputs:
    q: jnp.ndarray  # (T, N, H)
    kv_pages: jnp.ndarray  # (P, 2, K, S, H)
    kv_lens: jnp.ndarray  # (R,) int32
    block_tables: jnp.ndarray  # (R, Pmax) int32
    query_start_loc: jnp.ndarray  # (R + 1,) int32
    num_seqs: jnp.ndarray  # (1,) int32
    q_lens: tuple[int, ...]  # live requests only

    def args(self):
        """Positional arguments of ``ragged_paged_attention``."""
        return (self.q, self.kv_pages, self.kv_lens, self.block_tables, self.query_start_loc,
                self.num_seqs)

    @property
    def num_valid_rows(self) -> int:
        return int(sum(self.q_lens))


def make_inputs(seed: int, *, q_lens, kv_lens, num_kv_heads: int, group: int, head_dim: int,
                page_size: int, dtype=jnp.bfloat16, num_tokens: int | None = None,
                num_reqs: int | None = None, max_pages: int | None = None,
                free_pages: int = 3, kv_dtype=None) -> PagedInputs:
    """Builds one ragged batch.

    Args:
        seed: fresh randomness per test case.
        q_lens, kv_lens: per live request; ``q_lens[i] <= kv_lens[i]`` (context includes the
            new tokens, already written to the pool).
        num_kv_heads, group, head_dim, page_size: K, G (= N / K), H, S.
        num_tokens: T >= sum(q_lens); extra rows are padding (NaN queries).
        num_reqs: R >= len(q_lens); extra requests are padding (kv_len 0, q_len 0).
        max_pages: block-table width; default one more than the longest request needs.
        free_pages: extra never-used (NaN) pages in the pool.
        kv_dtype: the pool's dtype when it differs from q's (fp8: ``reference.quantize_kv``,
            NaN slots stay NaN).
    """
    rng = np.random.default_rng(seed)
    q_lens, kv_lens = list(q_lens), list(kv_lens)
    assert len(q_lens) == len(kv_lens) and all(0 <= a <= b for a, b in zip(q_lens, kv_lens))
    num_seqs = len(q_lens)
    num_reqs = num_reqs or max(num_seqs, 1)
    num_tokens = num_tokens or max(sum(q_lens), 1)
    assert num_reqs >= num_seqs and num_tokens >= sum(q_lens)
    num_q_heads = num_kv_heads * group

    need = [-(-n // page_size) for n in kv_lens]  # pages per live request
    max_pages = max_pages or max(need + [0]) + 1
    assert max_pages >= max(need + [0])
    num_pages = 1 + sum(need) + free_pages  # page 0 is the null page
    order = rng.permutation(np.arange(1, num_pages))

    pool = np.full((num_pages, 2, num_kv_heads, page_size, head_dim), np.nan, np.float32)
    tables = rng.integers(0, num_pages, size=(num_reqs, max_pages)).astype(np.int32)
    taken = 0
    for i, (n, p) in enumerate(zip(kv_lens, need)):
        pages = order[taken:taken + p]
        taken += p
        tables[i, :p] = pages
        for j, page in enumerate(pages):
            live = min(page_size, n - j * page_size)  # slots of this page holding real tokens
            pool[page, :, :, :live] = rng.standard_normal((2, num_kv_heads, live, head_dim))

    q = rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(np.float32)
    q[sum(q_lens):] = np.nan  # padding rows
    qsl = np.zeros(num_reqs + 1, np.int32)
    qsl[1:num_seqs + 1] = np.cumsum(q_lens)
    qsl[num_seqs + 1:] = qsl[num_seqs]
    lens = np.zeros(num_reqs, np.int32)
    lens[:num_seqs] = kv_lens
    kv_pages = reference.quantize_kv(jnp.asarray(pool), kv_dtype or dtype)
    return PagedInputs(
        q=jnp.asarray(q, dtype), kv_pages=kv_pages, kv_lens=jnp.asarray(lens),
        block_tables=jnp.asarray(tables), query_start_loc=jnp.asarray(qsl),
        num_seqs=jnp.asarray([num_seqs], jnp.int32), q_lens=tuple(q_lens))


def naive_attention(x: PagedInputs, *, sm_scale: float, soft_cap: float | None = None,
                    sliding_window: int | None = None) -> np.ndarray:
    """Per request, per query, per head float64 loop over the live context: (T, N, H)."""
    q = np.asarray(x.q.astype(jnp.float32), np.float64)
    pool = np.asarray(x.kv_pages.astype(jnp.float32), np.float64)
    tables, kv_lens = np.asarray(x.block_tables), np.asarray(x.kv_lens)
    qsl = np.asarray(x.query_start_loc)
    num_tokens, num_q_heads, _ = q.shape
    num_kv_heads, page_size = pool.shape[2], pool.shape[3]
    group = num_q_heads // num_kv_heads
    out = np.zeros(q.shape, np.float64)
    for i, q_len in enumerate(x.q_lens):
        n = int(kv_lens[i])
        pos = np.arange(n)
        pages, offs = tables[i, pos // page_size], pos % page_size
        k, v = pool[pages, 0, :, offs], pool[pages, 1, :, offs]  # (n, K, H)
        for j in range(q_len):
            row, qpos = qsl[i] + j, n - q_len + j
            keep = pos <= qpos
            if sliding_window is not None:
                keep &= pos > qpos - sliding_window
            for head in range(num_q_heads):
                s = k[keep, head // group] @ q[row, head] * sm_scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                p = np.exp(s - s.max())
                out[row, head] = p @ v[keep, head // group] / p.sum()
    return out


def assert_close(out, expected, *, dtype, num_valid_rows: int):
    """Stated tolerances: f32 ~1e-5 relative (f32 accumulate); bf16 2e-2 (bf16 inputs, bf16 P·V
    operands and a bf16 output). Padding rows must be exactly zero; nothing may be NaN."""
    out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.isfinite(out).all(), "NaN/inf in the output: something read past kv_len"
    assert (out[num_valid_rows:] == 0).all(), "padding rows must be zero"
    tol = 1e-5 if jnp.dtype(dtype) == jnp.float32 else 2e-2
    err = np.abs(out - expected).max() / max(np.abs(expected).max(), 1e-6)
    assert err < tol, f"max error {err:.3g} (relative to max |ref|) >= {tol}"
    rel = np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-6)
    assert rel < tol / 2, f"relative L2 error {rel:.3g} >= {tol / 2}"
