"""Standalone reproduction (JAX + Pallas only) of the Mosaic GPU failure NOTES.md, session 17,
traces to XLA: a custom call's operand that is a contiguous slice of a larger buffer reaches
the call as a view (dynamic-slice fusion) at a 128-byte offset, and Mosaic GPU's custom call
rejects it: "Input buffer 0 is not 256-byte aligned".

The kernel only copies its (16, 128) float32 input to its output through shared memory (TMA
in, TMA out). It is fed ``buf[off : off + 2048]`` of a float32 parameter, for offsets of 384
bytes (not 256-aligned) and 512 bytes (aligned), and once more with an elementwise op between
the slice and the kernel (no fusion). Prints one JSON line per case: whether XLA fused the
slice into the call, and what the call did.

    python tools/repro_mosaic_alignment.py              # on a Hopper GPU
    python tools/repro_mosaic_alignment.py --interpret  # CPU: the kernel in the interpreter
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS, COLS = 16, 128  # 8 KB: a multiple of XLA's slice alignment, so the slice may be fused


def copy_kernel(interpret: bool):
    def body(x_ref, o_ref, smem, bar):
        plgpu.copy_gmem_to_smem(x_ref, smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, o_ref)
        plgpu.wait_smem_to_gmem(0)

    kw = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw["interpret"] = InterpretGPUParams()
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((ROWS, COLS), jnp.float32),
                        scratch_types=[plgpu.SMEM((ROWS, COLS), jnp.float32),
                                       plgpu.Barrier(num_arrivals=1, num_barriers=1)], **kw)


def case(off_words: int, guard: bool, interpret: bool) -> dict:
    call = copy_kernel(interpret)
    n = ROWS * COLS

    def f(buf):
        x = buf[off_words:off_words + n].reshape(ROWS, COLS)
        if guard:  # an op XLA cannot fold away (buf >= 0 here): the slice lands in a fresh buffer
            x = jnp.maximum(x, 0.0)
        return call(x)

    buf = jnp.arange(off_words + n + 64, dtype=jnp.float32)
    r = dict(offset_bytes=4 * off_words, guard=guard)
    try:
        compiled = jax.jit(f).lower(buf).compile()
        r["dynamic_slice_fusion"] = "dynamic-slice-fusion" in compiled.as_text()
        out = np.asarray(compiled(buf))
        want = np.arange(off_words, off_words + n, dtype=np.float32).reshape(ROWS, COLS)
        r["status"] = "ok" if np.array_equal(out, want) else "wrong values"
    except Exception as e:  # the failure under study is an exception at launch
        r["status"] = f"{type(e).__name__}: {str(e)[:200]}"
    return r


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interpret", action="store_true", help="Mosaic GPU's CPU interpreter")
    args = ap.parse_args(argv)
    print(json.dumps(dict(jax=jax.__version__, device=jax.devices()[0].device_kind)))
    results = [case(off, guard, args.interpret)
               for off, guard in [(96, False), (128, False), (96, True)]]
    for r in results:
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    main()
