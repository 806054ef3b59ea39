#!/usr/bin/env bash
# Regenerate the shipped demo package `models/demo/` from nothing (no CLIP weights, no dataset):
# synthetic face clips, a CLIP stand-in pre-trained on synthetic frames, PE-CLIP adapted on top,
# exported int8 with calibration on the training clips and checked on the held-out clips, plus the
# neutral reference driver profiles are measured from.
# About 1.5 hours on an idle 2-core CPU (most of it pre-training). Usage: bash scripts/make-demo-package.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-target/demo-work}"
mkdir -p "$work"
cargo build --release --bin pe-clip
pe=target/release/pe-clip

# 700 train / 350 held-out clips, identities disjoint, 64 px
[ -f "$work/data/synth.json" ] || \
  $pe synth --out "$work/data" --train 700 --test 350 --size 64 --seed 7
# the CLIP stand-in (both towers from scratch, InfoNCE on frames and action-unit captions)
[ -f "$work/clip/pretrain.json" ] || \
  $pe pretrain --out "$work/clip" --image-size 64 --steps 6000 --batch-size 64 --lr 1e-3 --seed 1 \
    --log-every 500
# PE-CLIP on top (the epoch with the best held-out UAR is kept)
rm -rf "$work/run"
$pe train --data "$work/data" --out "$work/run" --arch "$work/clip" --epochs 8 --batch-size 8 \
    --lr-adapters 1e-3 --lr-prompts 1e-4 --warmup-epochs 1 --no-mix --jitter none --min-crop-area 1
$pe eval --checkpoint "$work/run" --data "$work/data" --split test --json > "$work/eval.json"
# the package: int8, calibrated on 64 training clips, checked against f32 on all 350 held-out clips
$pe export --int8 "$work/run" -o models/demo --calib "$work/data" --calib-clips 64 \
  --check "$work/data" --check-clips 350 --json > "$work/export.json"
# the population's resting face for driver profiles: all 100 neutral training clips
$pe calibrate --package models/demo --reference "$work/data"
rm -rf models/demo/previous
cat "$work/eval.json" "$work/export.json"
