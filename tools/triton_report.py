"""Compile report of the Pallas (Triton-lowered) attention kernels: registers, spills, shared
memory, occupancy and instruction mix, next to jax's own dense Pallas ``mha`` kernel.

XLA compiles a Pallas Triton call inside its own pipeline and reports nothing about it. This tool
captures the Triton IR that Pallas hands to XLA (by wrapping the lowering), compiles it again
with the standalone ``triton`` package (the one torch ships, when present) for the local GPU,
and reports, per kernel: registers/thread, spills, shared memory, CTAs per SM those allow, and
counts of async copies (``cp.async``, TMA), MMA instructions (``wgmma``, ``mma.sync``) and
``ex2`` in the PTX. The standalone Triton may differ in version from XLA's, so the numbers are
indicative of XLA's build, not identical to it.

    python tools/triton_report.py --out /tmp/treport   # on a GPU with torch's triton
    python tools/triton_report.py --ir-only --out ...   # any machine: the Triton IR only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PTX_PATTERNS = {"cp.async": r"\bcp\.async\.(?:ca|cg)\.shared", "tma": r"cp\.async\.bulk\.tensor",
                "wgmma": r"\bwgmma\.mma_async", "mma.sync": r"\bmma\.sync", "ld.global":
                r"\bld\.global", "ex2": r"\bex2\.approx", "bar.sync": r"\bbar\.sync"}
TTGIR_PATTERNS = {"async_copy": r"async_copy_global_to_local", "warp_group_dot":
                  r"warp_group_dot\b", "tt.dot": r"\btt\.dot\b", "local_alloc": r"local_alloc"}


def capture_ttir(fn, *args):
    """Triton IR (text) and (num_warps, num_stages) of every Pallas Triton call in ``fn``."""
    from jax._src.pallas.triton import lowering
    from jax._src.pallas.triton import pallas_call_registration as reg
    mods = []
    orig = lowering.lower_jaxpr_to_triton_module

    def wrapped(*a, **k):
        res = orig(*a, **k)
        mods.append(res.module.operation.get_asm(enable_debug_info=False))
        return res

    reg.lowering.lower_jaxpr_to_triton_module = wrapped
    try:
        dis = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        exp = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=dis)(*args)
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    text = exp.mlir_module()
    params = [(int(w), int(s)) for s, w in re.findall(
        r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)]
    if len(params) != len(mods):  # attribute order differs between jax versions
        params = [(int(w), int(s)) for w, s in re.findall(
            r"num_warps = (\d+) : i32.*?num_stages = (\d+) : i32", text)] or [(4, 3)] * len(mods)
    return list(zip(mods, params))


def compile_report(ttir: str, num_warps: int, num_stages: int, path: str):
    import triton
    from triton.backends.compiler import GPUTarget
    with open(path, "w") as f:
        f.write(ttir)
    major, minor = jax.devices()[0].compute_capability.split(".")
    target = GPUTarget("cuda", int(major + minor), 32)
    ck = triton.compile(path, target=target,
                        options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx, ttgir = ck.asm.get("ptx", ""), ck.asm.get("ttgir", "")
    with open(path.replace(".ttir", ".ttgir"), "w") as f:
        f.write(ttgir)
    shared = int(getattr(ck.metadata, "shared", 0))
    regs, spills = int(getattr(ck, "n_regs", 0) or 0), int(getattr(ck, "n_spills", 0) or 0)
    threads = 32 * num_warps
    by_regs = 65536 // max(1, regs * threads) if regs else None
    by_smem = (228 * 1024) // (shared + 1024) if shared else None  # +1 KB reserved per CTA
    occ = min(x for x in (by_regs, by_smem, 64 // num_warps) if x is not None)
    return dict(num_warps=num_warps, num_stages=num_stages, regs=regs, spills=spills,
                shared_bytes=shared, ctas_per_sm=occ, ctas_by_regs=by_regs, ctas_by_smem=by_smem,
                ptx={k: len(re.findall(p, ptx)) for k, p in PTX_PATTERNS.items()},
                ttgir={k: len(re.findall(p, ttgir)) for k, p in TTGIR_PATTERNS.items()},
                triton_version=triton.__version__)


def kernels():
    """(label, fn, args) of the kernels to report: ours on the mixed batch's prefill half."""
    import bench_kernels as bk
    from jax.experimental.pallas.ops.gpu import attention as pmha
    md, q, pools, _ = bk.mixed_batch(16, seed=21, scale=0.25)
    pre = dict(md, num_seqs=jnp.asarray([4], jnp.int32))
    out = [(f"ours_{name}", lambda q, p, cfg=cfg: bk.ours_ragged(pre, **cfg)(q, p), (q, pools[0]))
           for name, cfg in (("default", {}), ("no_decode_tile", dict(decode_tile=False)),
                             ("index_s3", dict(prefetch="index")),
                             ("index_s4", dict(prefetch="index", num_stages=4)))]
    out.append(("ours_decode_kernel", lambda q, p: bk.ours_decode(md)(q[:64], p), (q, pools[0])))
    out.append(("ours_decode_kernel_index", lambda q, p: bk.ours_decode(md, prefetch="index")(
        q[:64], p), (q, pools[0])))
    qd = jnp.zeros((4, 1024, 32, 128), jnp.bfloat16)
    bs = pmha.BlockSizes(block_q=64, block_k=64, block_q_dkv=32, block_kv_dkv=32,
                         block_q_dq=32, block_kv_dq=32)
    out.append(("jax_mha_q64_k64_w4_s3", lambda q, k, v: pmha.mha(
        q, k, v, None, sm_scale=0.1, causal=True, block_sizes=bs, num_warps=4, num_stages=3),
        (qd, qd, qd)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="triton_report_out")
    p.add_argument("--ir-only", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    report = {}
    for label, fn, fargs in kernels():
        for i, (ttir, (warps, stages)) in enumerate(capture_ttir(fn, *fargs)):
            name = label if i == 0 else f"{label}_{i}"
            path = os.path.join(args.out, f"{name}.ttir")
            if args.ir_only:
                with open(path, "w") as f:
                    f.write(ttir)
                report[name] = dict(num_warps=warps, num_stages=stages, ttir_lines=ttir.count("\n"))
            else:
                try:
                    report[name] = compile_report(ttir, warps, stages, path)
                except Exception as e:  # keep going: one kernel's failure is a finding too
                    report[name] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
            print(name, json.dumps(report[name]), flush=True)
    with open(os.path.join(args.out, "triton_report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
