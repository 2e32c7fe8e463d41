#!/usr/bin/env bash
# Below-4-bit comparison on the GPU (issue: SpQR and AQLM vs GPTQ at matched bits per weight).
#   bash scripts/lowbit_gpu.sh smol OUT [ASSETS]   SmolLM2 records (calibration 128 x 512, 24 test windows)
#   bash scripts/lowbit_gpu.sh bench OUT           per-block times at the Llama-3-8B shape (random weights)
set -u
mode=$1 out=$2 assets=${3:-}
mkdir -p "$out"
if [ "$mode" = smol ]; then
    common="model=smollm2-135m-instruct calib.nsamples=128 calib.seqlen=512 eval.max_windows=24 device=cuda"
    [ -n "$assets" ] && common="$common paths.assets=$assets"
    run() { name=$1; shift; timeout 900 python -m ptq.run $common output_dir="$out/$name" "$@" > "$out/$name.log" 2>&1;
            echo "$name rc=$? $(grep -h 'ppl:' "$out/$name.log" | tail -1)"; tail -4 "$out/$name.log" | head -3; }
    for job in ${JOBS:-none gptq_w2_g64 gptq_w3_g128 aqlm_2x8 aqlm_2x8_ft aqlm_3x8 aqlm_3x8_ft}; do
        case $job in
            none) run none method=none ;;
            gptq_w2_g64) run $job method=gptq bits=2 group_size=64 ;;
            gptq_w3_g128) run $job method=gptq bits=3 group_size=128 ;;
            awq+gptq_w2_g64) run $job method=awq+gptq bits=2 group_size=64 ;;
            awq+gptq_w3_g128) run $job method=awq+gptq bits=3 group_size=128 ;;
            spqr_w3_g32) run $job method=spqr bits=3 group_size=32 method.spqr.stat_group=32 method.spqr.outlier_threshold=1.0 ;;
            aqlm_2x8) run $job method=aqlm bits=2 method.aqlm.codebooks=2 method.aqlm.codebook_bits=8 ;;
            aqlm_2x8_ft) run $job method=aqlm bits=2 method.aqlm.codebooks=2 method.aqlm.codebook_bits=8 method.aqlm.finetune_epochs=${EPOCHS:-10} ;;
            aqlm_3x8) run $job method=aqlm bits=3 method.aqlm.codebooks=3 method.aqlm.codebook_bits=8 ;;
            aqlm_3x8_ft) run $job method=aqlm bits=3 method.aqlm.codebooks=3 method.aqlm.codebook_bits=8 method.aqlm.finetune_epochs=${EPOCHS:-10} ;;
        esac
    done
elif [ "$mode" = bench ]; then
    bench() { name=$1; shift; timeout ${LIMIT:-300} python -m ptq.bench --repeat 1 --out "$out/$name.json" "$@" > "$out/$name.log" 2>&1;
              echo "$name rc=$? $(grep -h median "$out/$name.log" | tail -1)"; tail -2 "$out/$name.log"; }
    for job in ${JOBS:-gptq spqr aqlm_2x8 aqlm_1x16}; do
        case $job in
            gptq) bench gptq_w2g64_llama3-8b_2layers_h200 --method gptq --bits 2 --group-size 64 --layers 2 ;;
            spqr) bench spqr_w3g16_llama3-8b_2layers_h200 --method spqr --bits 3 --group-size 16 --layers 2 ;;
            aqlm_2x8) bench aqlm_2x8_llama3-8b_1layer_h200 --method aqlm --bits 2 --layers 1 --option aqlm.codebooks=2 --option aqlm.codebook_bits=8 ;;
            aqlm_1x16) bench aqlm_1x16_llama3-8b_1layer_h200 --method aqlm --bits 2 --layers 1 --option aqlm.beam_size=1 ;;
        esac
    done
fi
