#!/usr/bin/env bash
# ViLD's smoke run in one command, as the reference would run it with its offline step: the proposal stage
# (ViLD-text alone), the teacher's embeddings of its proposals' crops, then ViLD (text + image) on them.
#
#   launch/smoke_vild.sh SMOKE_EXPORT.msgpack [OUT]     (SMOKE_EXPORT: the README's smoke CLIP, exported)
#
# OUT (default /tmp/smoke_vild) gets proposals/ (the first run), regions/ (TFRecords: the scenes with their
# regions) and vild/ (the run, its metrics.jsonl and the detection figures). A step already done is skipped.
set -euo pipefail
if [[ $# -lt 1 || ! -f $1 ]]; then
  echo "usage: $0 SMOKE_EXPORT.msgpack [OUT]  (python -m clip_jax.export --workdir=SMOKE --out=DIR/rn)" >&2
  exit 2
fi
EXPORT=$1
OUT=${2:-/tmp/smoke_vild}
PYTHON=${PYTHON:-python3}
PROPOSAL_STEPS=${PROPOSAL_STEPS:-400}
mkdir -p "$OUT"
"$PYTHON" -m clip_jax.train --config=configs/smoke_vild.py --workdir="$OUT/proposals" --config.init_from="$EXPORT" \
  --config.vild.distill_weight=0 --config.total_steps="$PROPOSAL_STEPS" --config.optim.decay_boundaries="()" \
  --config.eval_every_steps=0
# Crops of 2x and 3x the proposal (the reference's are 1x and 1.5x for photos): the smoke CLIP saw shapes 16% to 42%
# of its input wide, which a 2x-3x crop of an object gives (docs/methods.md: its accuracy on true boxes' crops).
if [[ ! -f $OUT/regions/regions.json ]]; then
  "$PYTHON" -m clip_jax.embed regions --data=shapes_scenes:train --teacher="$EXPORT" --workdir="$OUT/proposals" \
    --out="$OUT/regions" --max_regions=8 --scales=2.0,3.0
fi
"$PYTHON" -m clip_jax.train --config=configs/smoke_vild.py --workdir="$OUT/vild" --config.init_from="$EXPORT" \
  --config.data.train="tfrecord:$OUT/regions/*"
