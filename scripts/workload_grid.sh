#!/usr/bin/env bash
# Where quantization hurts (issue 24) on SmolLM2-135M-Instruct: GPTQ w4 and w3 and AWQ w4 (group 128), scored on
# WikiText-2 and on a second, different text (PTB test), with per-window losses; calibration 128 x 512 WikiText-2
# validation tokens, 24 test windows of 2048 per text.
#   bash scripts/workload_grid.sh OUT_DIR [extra settings, e.g. device=cuda paths.assets=...]
# then: python -m ptq.report OUT_DIR --out OUT_DIR; python -m ptq.report --where-it-hurts OUT_DIR --out OUT_DIR
set -euo pipefail
out=$1; shift
mkdir -p "$out"
PY=${PYTHON:-python}
common=(model=smollm2-135m-instruct model.dtype=float32 calib.nsamples=128 calib.seqlen=512 eval.max_windows=24
        "eval.ppl=[wikitext2,ptb]" eval.per_example=true "$@")
$PY -m ptq.run -m method=gptq,awq bits=4 "${common[@]}" "hydra.sweep.dir=$out/sweep0" > "$out/sweep0.log" 2>&1
$PY -m ptq.run -m method=gptq bits=3 "${common[@]}" "hydra.sweep.dir=$out/sweep1" > "$out/sweep1.log" 2>&1
