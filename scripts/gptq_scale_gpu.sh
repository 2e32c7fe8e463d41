#!/usr/bin/env bash
# GPTQ at scale on one GPU (issue: beyond one GPU; its one-GPU targets).
#   bash scripts/gptq_scale_gpu.sh OUT [8b|70b|all]
# 8b: GPTQ's GPU tests, then the Llama-3-8B shape resident (target 25 s), with the default true-sequential
#     stages and with one statistics pass per block (true_sequential=false, llm-compressor's granularity);
# 70b: the Llama-3-70B shape offloaded, each block's random weights drawn when the pipeline reads it (target
#     6 minutes). Per-block lines with their ETA go to OUT/*.log as the runs go. Each part fits one 10-minute slot.
set -u
py=${PYTHON:-$(command -v python || command -v python3)}
out=$1 part=${2:-all}
mkdir -p "$out"
if [ "$part" != 70b ]; then
    timeout ${TEST_LIMIT:-120} "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$out/tests.log" 2>&1
    echo "tests rc=$? $(grep -E 'passed|failed' "$out/tests.log" | tail -1)"
    timeout ${EIGHT_B_LIMIT:-150} "$py" -m ptq.bench --method gptq --repeat 2 \
        --out "$out/gptq_w4g128_llama3-8b_h200.json" 2> "$out/gptq8b.log" | tail -1 | cut -c1-400
    timeout ${EIGHT_B_LIMIT:-150} "$py" -m ptq.bench --method gptq --repeat 2 --option gptq.true_sequential=false \
        --out "$out/gptq_w4g128_llama3-8b_h200_one_pass.json" 2> "$out/gptq8b_one_pass.log" | tail -1 | cut -c1-400
fi
if [ "$part" != 8b ]; then
    timeout ${SEVENTY_B_LIMIT:-540} "$py" -m ptq.bench --shape llama-3-70b --random-lazy --offload --method gptq \
        --repeat 1 --out "$out/gptq_w4g128_llama3-70b_h200_offload.json" 2> "$out/gptq70b.log" | tail -1 | cut -c1-400
    grep -E "quantized in" "$out/gptq70b.log" | tail -3
fi
