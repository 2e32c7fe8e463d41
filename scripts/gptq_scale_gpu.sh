#!/usr/bin/env bash
# GPTQ at scale on one GPU (issue: beyond one GPU; its one-GPU targets).
#   bash scripts/gptq_scale_gpu.sh OUT
# 1. GPTQ's GPU tests; 2. the Llama-3-8B shape, whole model resident (target 25 s); 3. the Llama-3-70B shape,
# offloaded, each block's random weights drawn when the pipeline reads it (target 6 minutes). Per-block lines
# with their ETA go to OUT/*.log as the runs go.
set -u
out=$1
mkdir -p "$out"
timeout ${TEST_LIMIT:-120} python -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$out/tests.log" 2>&1
echo "tests rc=$? $(grep -E 'passed|failed' "$out/tests.log" | tail -1)"
timeout ${EIGHT_B_LIMIT:-150} python -m ptq.bench --method gptq --repeat 2 \
    --out "$out/gptq_w4g128_llama3-8b_h200.json" 2> "$out/gptq8b.log" | tail -1 | cut -c1-400
timeout ${SEVENTY_B_LIMIT:-480} python -m ptq.bench --shape llama-3-70b --random-lazy --offload --method gptq \
    --repeat 1 --out "$out/gptq_w4g128_llama3-70b_h200_offload.json" 2> "$out/gptq70b.log" | tail -1 | cut -c1-400
grep -E "quantized in" "$out/gptq70b.log" | tail -3
