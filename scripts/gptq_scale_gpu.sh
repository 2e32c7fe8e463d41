#!/usr/bin/env bash
# GPTQ at scale (issue: beyond one GPU).
#   bash scripts/gptq_scale_gpu.sh OUT [8b|70b|2gpu|all]
# 8b:   GPTQ's GPU tests, then the Llama-3-8B shape resident (target 25 s), with the default true-sequential
#       stages and with one statistics pass per block (true_sequential=false, llm-compressor's granularity);
# 70b:  the Llama-3-70B shape offloaded, each block's random weights drawn when the pipeline reads it (target
#       6 minutes), activations in host memory (offloading's default), then on the GPU (--activations device);
# 2gpu: under torchrun on 2 GPUs: the 8B shape (target 15 s), the 70B shape (target 3.5 minutes), the first 4
#       blocks of the 70B shape with AWQ (per-rank memory in the record), and a 3 methods x 2 bit-widths sweep of
#       stories260K over both GPUs with Hydra's joblib launcher (set PTQ_ASSETS to the assets folder).
# Per-block lines with their ETA go to OUT/*.log as the runs go. 8b and 2gpu fit one 10-minute slot each; 70b two.
set -u
py=${PYTHON:-$(command -v python || command -v python3)}
out=$1 part=${2:-all}
mkdir -p "$out"
bench() {  # bench NAME LIMIT ARGS...: one ptq.bench run, its record OUT/NAME.json, its log OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" --out "$out/$name.json" 2> "$out/$name.log" | tail -1 | cut -c1-400
}
if [ "$part" = 8b ] || [ "$part" = all ]; then
    timeout ${TEST_LIMIT:-120} "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$out/tests.log" 2>&1
    echo "tests rc=$? $(grep -E 'passed|failed' "$out/tests.log" | tail -1)"
    bench gptq_w4g128_llama3-8b_h200 150 "$py" -m ptq.bench --method gptq --repeat 2
    bench gptq_w4g128_llama3-8b_h200_one_pass 150 "$py" -m ptq.bench --method gptq --repeat 2 \
        --option gptq.true_sequential=false
fi
if [ "$part" = 70b ] || [ "$part" = all ]; then
    seventy=("$py" -m ptq.bench --shape llama-3-70b --random-lazy --offload --method gptq --repeat 1)
    bench gptq_w4g128_llama3-70b_h200_offload 540 "${seventy[@]}"
    bench gptq_w4g128_llama3-70b_h200_offload_activations_device 540 "${seventy[@]}" --activations device
fi
if [ "$part" = 2gpu ] || [ "$part" = all ]; then
    tr=("$py" -m torch.distributed.run --nproc-per-node 2)
    bench gptq_w4g128_llama3-8b_h200x2_ws2 120 "${tr[@]}" -m ptq.bench --method gptq --repeat 2
    bench gptq_w4g128_llama3-70b_h200x2_ws2_offload_activations_device 270 "${tr[@]}" -m ptq.bench \
        --shape llama-3-70b --random-lazy --offload --activations device --method gptq --repeat 1
    bench awq_w4g128_llama3-70b_h200x2_ws2_offload_4layers 120 "${tr[@]}" -m ptq.bench \
        --shape llama-3-70b --layers 4 --random-lazy --offload --method awq --repeat 1
    start=$(date +%s)
    timeout 120 "$py" -m ptq.run -m model=stories260k method=rtn,gptq,awq bits=3,4 hydra/launcher=joblib \
        hydra.launcher.n_jobs=2 hydra.sweep.dir="$out/sweep_2gpu" > "$out/sweep_2gpu.log" 2>&1
    echo "sweep rc=$? in $(( $(date +%s) - start )) s"
fi
