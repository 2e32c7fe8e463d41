#!/usr/bin/env bash
# The rotations grid of the README (issue 16) on SmolLM2-135M-Instruct: full precision, the rotated unquantized
# model, and W4A4 in int4 (per-channel weights, per-token activations), NVFP4 and MXFP4 with RTN vs QuaRot (RTN)
# vs GPTQ vs QuaRot+GPTQ; W4A4KV4; W4A16 GPTQ vs QuaRot+GPTQ. Calibration 128 x 512, 24 test windows of 2048.
#   bash scripts/quarot_grid.sh OUT_DIR [extra settings, e.g. device=cuda paths.assets=...]
# Sweeps run JOBS at a time (default 1); each writes one record per job under OUT_DIR; then
#   python -m ptq.report OUT_DIR --out OUT_DIR
set -euo pipefail
source "$(dirname "$0")/sweeps.sh"
out=$1; shift
common=(model=smollm2-135m-instruct model.dtype=float32 calib.nsamples=128 calib.seqlen=512 eval.max_windows=24 "$@")
sweeps=(
  "method=none"
  "method=quarot bits=16"
  "method=rtn,quarot,quarot+gptq scheme=w4a4"
  "method=rtn,quarot,quarot+gptq scheme=nvfp4"
  "method=rtn,quarot,quarot+gptq scheme=mxfp4"
  "method=gptq,quarot+gptq scheme=w4a16"
  "method=gptq scheme=w4a4,nvfp4,mxfp4"
  "method=rtn,quarot,quarot+gptq scheme=w4a4kv4"
)
run_sweeps "$out"
