#!/usr/bin/env bash
# One GPU campaign of the precision-scaling study, as run on the device machine: unpack the shipped corpus
# shards, train, measure every checkpoint, and pack the records and checkpoint metadata (never the weights).
#   scripts/study_campaign.sh <name> "<train overrides>" "<precision overrides>" [train_timeout_s] [precision_timeout_s]
# Shipped corpus: $src/ holds meta.json, tokenizer.json, tokenizer/, val_000.bin.xz and the first train
# shards as train_NNN.bin.xz (ptq.study reads a prefix of the training shards).
set -u
src=${STUDY_DATA:-.studydata}; corpus=${STUDY_CORPUS:-.study/gutenberg}
name=$1; train_args=$2; precision_args=$3; train_timeout=${4:-420}; precision_timeout=${5:-240}
out=${OUT:-.study/out}; mkdir -p "$out" $corpus
export PYTHONUNBUFFERED=1
if [ ! -f $corpus/meta.json ]; then
  cp -r "$src/meta.json" "$src/tokenizer.json" "$src/tokenizer" "$corpus/"
  for f in "$src"/*.xz; do python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" "$corpus/$(basename "${f%.xz}")"; done
fi
ls $corpus
# shellcheck disable=SC2086
timeout "$train_timeout" python -m ptq.study train data=$corpus out=.study/ckpt-$name $train_args 2>&1 | grep -v "Writing model shards" | tee "$out/train-$name.log"
# shellcheck disable=SC2086
timeout "$precision_timeout" python -m ptq.study precision checkpoints=.study/ckpt-$name data=$corpus study=gutenberg out=.study/results $precision_args 2>&1 | grep -E "δ|error|Error|Traceback" | tee "$out/precision-$name.log"
mkdir -p .study/meta-$name
for d in .study/ckpt-$name/*/; do [ -f "$d/study.json" ] && cp "$d/study.json" ".study/meta-$name/$(basename "$d").json"; done
tar czf "$out/study-$name.tgz" -C .study results "meta-$name"
ls -la "$out"
