#!/usr/bin/env bash
# The number-formats grid of the README (issue 15) on SmolLM2-135M-Instruct: full precision; RTN, GPTQ and
# AWQ x {int4 g128 asym, int4 g32, nvfp4a16, mxfp4a16, fp8 weights}; W8A8 int8 vs fp8 (RTN, SmoothQuant);
# W4A4 nvfp4 vs mxfp4 vs int4 per-token (RTN, GPTQ). Calibration 128 x 512, 24 test windows of 2048.
#   bash scripts/formats_grid.sh OUT_DIR [extra settings, e.g. device=cuda model.path=...]
# Sweeps run in parallel (JOBS at a time, default 1); each writes one record per job under OUT_DIR.
set -euo pipefail
source "$(dirname "$0")/sweeps.sh"
out=$1; shift
common=(model=smollm2-135m-instruct model.dtype=float32 calib.nsamples=128 calib.seqlen=512 eval.max_windows=24 "$@")
sweeps=(
  "method=none"
  "method=rtn,gptq,awq scheme=w4a16"
  "method=rtn,gptq,awq format=int bits=4 group_size=32"
  "method=rtn,gptq,awq scheme=nvfp4a16"
  "method=rtn,gptq,awq scheme=mxfp4a16"
  "method=rtn,gptq,awq format=fp8_e4m3"
  "method=rtn,smoothquant scheme=w8a8"
  "method=rtn,smoothquant scheme=fp8"
  "method=rtn,gptq scheme=nvfp4,mxfp4"
  "method=rtn,gptq format=int bits=4 group_size=-1 sym=true act_format=int act_bits=4"
)
run_sweeps "$out"
