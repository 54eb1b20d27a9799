"""Helpers shared by the Mosaic GPU kernel's tiles (``ragged_mosaic``, ``_mosaic_decode``)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def register_ops(interpret: bool):
    """(iota, in_layout, load_tile, load_row) in wgmma's register layout, or — for Mosaic GPU's
    interpreter, which knows no register layouts — their plain jnp forms."""
    if interpret:
        def iota(shape, dim):
            return lax.broadcasted_iota(jnp.int32, shape, dim)

        def in_layout(x, layout):
            del layout
            return x

        def load_tile(ref, fast=True):
            del fast
            return ref[...]

        return iota, in_layout, load_tile, load_tile

    def iota(shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def load_tile(ref, fast=True):  # fast=False: allow a bank-conflicted transfer (untiled)
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=fast)

    def load_row(ref):
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))

    return iota, plgpu.layout_cast, load_tile, load_row


def interpreter():
    """Mosaic GPU's CPU interpreter (private in JAX 0.10). Reads past an array's end return the
    interpreter's fill value (NaN) where the TMA unit would return zeros: only query rows of a
    tile's dead tail read there, and nothing of them is stored."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # pragma: no cover - depends on the installed JAX
        raise NotImplementedError("this JAX has no Mosaic GPU interpreter") from e
    return InterpretGPUParams(out_of_bounds_reads="uninitialized")


def store_rows(o_smem, o_ref, row0, n_rows, kv_head, group, block_q):
    """TMA stores of the first ``n_rows`` rows of each head's block_q-row band of ``o_smem``
    to ``o_ref[row0 : row0 + n_rows, head]``. TMA boxes are static, so a partial band goes out
    as a ladder of power-of-two pieces (n_rows = 13: 8 + 4 + 1)."""
    for g in range(group):
        head = kv_head * group + g

        @pl.when(n_rows == block_q)
        def _full():
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(g * block_q, block_q)],
                                    o_ref.at[pl.ds(row0, block_q), head])

        @pl.when(n_rows < block_q)
        def _ladder():
            done = jnp.int32(0)
            size = block_q // 2
            while size:
                @pl.when(lax.bitwise_and(n_rows, jnp.int32(size)) != 0)
                def _piece():
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(g * block_q + done, size)],
                                            o_ref.at[pl.ds(row0 + done, size), head])

                done = done + lax.bitwise_and(n_rows, jnp.int32(size))
                size //= 2
