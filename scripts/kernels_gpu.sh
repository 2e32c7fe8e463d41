#!/usr/bin/env bash
# The quantized-linear kernels on one GPU (issue: W4A16, INT8 and FP8 W8A8 kernels that beat bf16).
#   bash scripts/kernels_gpu.sh OUT [FORMATS]
# 1. the kernel tests on CUDA; 2. every format's linears of one Llama-3-8B block, timed from CUDA graphs
# (ptq.bench.kernels); 3. ncu's memory throughput of the one-token kernel on the largest linear (where
# Nsight Compute runs); 4. the whole-model benchmark (ptq.bench.infer) with the cost report.
# 4 times the torch.compiled decode too (step fusion around the linears) and prices it; NO_COMPILE=1 skips that.
# 2b. every one-token candidate tile on four Llama-3-8B linears, and the 16-row INT4 tiles on three
# (scripts/one_token_candidates.py). 5. bf16 and FP8 with the layers as stored (--no-fuse), beside 4's joined
# ones: FP8's prefill fell with joined products (0.78x against 1.23x separate, in different runs); and FP8 alone
# in its process, with the host time per W8A8 call (FP8's prefill was host-bound after a compiled format).
# 6. GemLite's layers beside ptq's (scripts/library_kernels.py), where GemLite is installed.
set -u
py=${PYTHON:-$(command -v python || command -v python3)}
out=$1 formats=${2:-bf16,w4a16,w8a8,fp8,nvfp4,mxfp4,w4a16-actorder,w4a16-tinygemm}
compile=--compile
[ -n "${NO_COMPILE:-}" ] && compile=
mkdir -p "$out"
timeout ${TEST_LIMIT:-480} "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py > "$out/tests.log" 2>&1
echo "tests rc=$? $(grep -E 'passed|failed' "$out/tests.log" | tail -1)"
timeout ${KERNELS_LIMIT:-300} "$py" -m ptq.bench.kernels --formats "$formats" --rows 1,16,2048 --out "$out/kernels.json" 2>&1 | tail -20
timeout ${CANDIDATES_LIMIT:-200} "$py" scripts/one_token_candidates.py > "$out/candidates.log" 2>&1; tail -40 "$out/candidates.log"
timeout ${CANDIDATES_LIMIT:-200} "$py" scripts/one_token_candidates.py --rows 16 --formats int4 --linears q,gate,down \
    > "$out/candidates16.log" 2>&1; tail -18 "$out/candidates16.log"
if [ -n "${NCU:-}" ] && command -v ncu > /dev/null; then
    timeout 200 ncu --clock-control none --kernel-name regex:gemv --launch-count 3 \
        --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
        "$py" -c "
import torch
from ptq.bench.infer import make_layer
w = torch.randn(14336, 4096, device='cuda', dtype=torch.bfloat16) * 0.02
x = torch.randn(1, 4096, device='cuda', dtype=torch.bfloat16)
for fmt in ('w4a16', 'w8a8', 'nvfp4'):
    layer = make_layer(fmt, w)
    for _ in range(3):
        layer(x)
" > "$out/ncu.log" 2>&1
    grep -E "gemv|dram__|registers|warps_active" "$out/ncu.log" | head -40
fi
timeout ${INFER_LIMIT:-1500} "$py" -m ptq.bench.infer --formats "$formats" --decode-batches 1,16 --repeat 3 $compile \
    --price-per-gpu-hour 3.50 --out "$out/infer.json" 2>&1 | grep -v Warn | cut -c1-400 | tail -12
timeout ${INFER_LIMIT:-1500} "$py" -m ptq.bench.infer --formats bf16,fp8 --decode-batches 1 --repeat 3 --no-fuse \
    --out "$out/infer_no_fuse.json" 2>&1 | grep -v Warn | cut -c1-400 | tail -4
timeout 60 "$py" scripts/layer_host_time.py 2>&1 | tail -6
timeout ${INFER_LIMIT:-1500} "$py" -m ptq.bench.infer --formats fp8 --decode-batches 1 --repeat 3 --profile \
    --out "$out/infer_fp8_alone.json" 2>&1 | grep -v Warn | cut -c1-400 | tail -2
if "$py" -c "import gemlite" 2> /dev/null; then
    timeout ${LIBRARY_LIMIT:-300} "$py" scripts/library_kernels.py --rows 1,16,2048 --out "$out/library.json" 2>&1 | tail -40
fi
