#!/usr/bin/env bash
# Nsight Compute on one launch of the ragged kernel (the mixed batch's prefill half) and of jax's
# dense Pallas mha on about the same work: throughput, warp stalls, pipe use. Needs ncu (the GPU
# machine has /usr/local/cuda/bin/ncu). Usage: bash tools/ncu_prefill.sh [ragged kwargs JSON]
set -uo pipefail
NCU=${NCU:-ncu}
SECTIONS="--section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis"
KEEP='Duration|Throughput|Stall|Warp Cycles|Issued Ipc|Issue Slots|Executed Ipc|Pipe|L2 Hit|L1/TEX Hit|Mem Busy|Registers|ms$|us$'
echo "== ours ${1:-{\}}"
$NCU --kernel-name regex:jaxpage_ragged --launch-count 1 $SECTIONS \
  python3 tools/study_prefill.py --once "${1:-{\}}" 2>&1 | grep -E "$KEEP" | grep -v -i warn
echo "== jax mha (dense, causal, 4 x 1024, 32 heads)"
$NCU --kernel-name regex:mha --launch-count 1 $SECTIONS python3 -c "
import jax, jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as a
q = jax.random.normal(jax.random.key(0), (4, 1024, 32, 128), jnp.bfloat16)
bs = a.BlockSizes(block_q=64, block_k=64, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32,
                  block_kv_dq=32)
f = jax.jit(lambda q: a.mha(q, q, q, None, sm_scale=0.1, causal=True, block_sizes=bs,
                            num_warps=4, num_stages=3))
for _ in range(3):
    jax.block_until_ready(f(q))
" 2>&1 | grep -E "$KEEP" | grep -v -i warn
