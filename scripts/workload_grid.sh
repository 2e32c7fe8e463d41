#!/usr/bin/env bash
# Where quantization hurts (issue 24) on SmolLM2-135M-Instruct: GPTQ w4 and w3 and AWQ w4 (group 128), scored on
# WikiText-2 and on a second, different text (PTB test), with per-window losses; calibration 128 x 512 WikiText-2
# validation tokens, 24 test windows of 2048 per text.
#   bash scripts/workload_grid.sh OUT_DIR [extra settings, e.g. device=cuda paths.assets=...]
# then: python -m ptq.report OUT_DIR --out OUT_DIR; python -m ptq.report --where-it-hurts OUT_DIR --out OUT_DIR
set -euo pipefail
source "$(dirname "$0")/sweeps.sh"
out=$1; shift
common=(model=smollm2-135m-instruct model.dtype=float32 calib.nsamples=128 calib.seqlen=512 eval.max_windows=24
        "eval.ppl=[wikitext2,ptb]" eval.per_example=true "$@")
sweeps=("method=gptq,awq bits=4" "method=gptq bits=3")
run_sweeps "$out"
