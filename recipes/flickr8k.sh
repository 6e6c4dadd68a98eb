#!/usr/bin/env bash
# The shipped Flickr8k model from raw images: prepare, cache features, cross-entropy (two cosine cycles),
# self-critical CIDEr-D fine-tuning, test-split evaluation, fp16 export. Prints and records each stage's wall time.
#   recipes/flickr8k.sh FLICKR8K_DIR WORK_DIR      (FLICKR8K_DIR holds Flickr8k.token.txt and images/)
set -euo pipefail
data_dir=${1:?usage: recipes/flickr8k.sh FLICKR8K_DIR WORK_DIR}
work=${2:?usage: recipes/flickr8k.sh FLICKR8K_DIR WORK_DIR}
sat=${SAT:-sat}
mkdir -p "$work"
times="$work/stage_seconds.txt"
: >"$times"
stage() {  # stage NAME COMMAND...: run it, append "NAME SECONDS" to $times
  local name=$1 start
  shift
  start=$(date +%s)
  "$@"
  echo "$name $(($(date +%s) - start))" | tee -a "$times"
}
stage prepare "$sat" prepare --dataset flickr8k --data-dir "$data_dir" --out "$work/prepared"
stage features "$sat" features --data "$work/prepared" --out "$work/features" --batch-size 32
common=(--data "$work/prepared" --features "$work/features" --batch-size 100 --checkpoint-every-steps 100)
stage train_xe "$sat" train "${common[@]}" --run-dir "$work/xe" --epochs 3 --decoder-lr 5e-4
stage train_xe_restart "$sat" train "${common[@]}" --run-dir "$work/xe2" --init-from "$work/xe/best" \
  --epochs 3 --decoder-lr 3e-4 --seed 1
# Self-critical training with the references' cross-entropy mixed in (plain SCST collapses on Flickr8k).
stage train_scst "$sat" train "${common[@]}" --run-dir "$work/scst" --init-from "$work/xe2/best" \
  --self-critical --scst-xe-weight 0.2 --batch-size 250 --epochs 1 --decoder-lr 2e-5 --warmup-steps 20 \
  --val-every-steps 40 --patience 4
stage train_scst_2 "$sat" train "${common[@]}" --run-dir "$work/scst2" --init-from "$work/scst/best" \
  --self-critical --scst-xe-weight 0.1 --batch-size 250 --epochs 1 --decoder-lr 5e-5 --warmup-steps 10 \
  --val-every-steps 30 --patience 3
stage evaluate "$sat" evaluate "$work/scst2/best" --data "$work/prepared" --features "$work/features" \
  --split test --beam 1 3 5 --out "$work/test"
stage export "$sat" export "$work/scst2/best" --out "$work/shipped"
