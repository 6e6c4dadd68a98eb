#!/usr/bin/env bash
# Raw Flickr8k photos to the quality of the cross-entropy model shipped before issue 30 (test CIDEr >= 59 and
# BLEU-4 >= 23.5 at the default beam) within 90 minutes on a 2-core CPU, features and evaluation included (issue
# 33): prepare; cache 14x14 features of 448 px photos (encoder in its fastest precision that keeps the captions);
# one cosine cycle of cross-entropy under bf16 autocast (PRECISION); a short self-critical cycle (CIDEr-D
# reward, the study of recipes/flickr8k_scst.sh); the 2:1 mean of its best and the cross-entropy best (as the
# shipped model is made), its int8 decoder calibrated; the test split at the default beam. Prints and records each
# stage's wall time (results/flickr8k_90min.json holds a recorded run).
#   recipes/flickr8k_90min.sh FLICKR8K_DIR WORK_DIR      (FLICKR8K_DIR holds Flickr8k.token.txt and images/)
# XE_EPOCHS (default 8) and SCST_EPOCHS (default 2, 300 steps each) set the two cycles' lengths.
# PRECISION (default bf16) is the cross-entropy cycle's: fp32 on CPUs without native bf16 (emulated bf16 is slow).
set -euo pipefail
data_dir=${1:?usage: recipes/flickr8k_90min.sh FLICKR8K_DIR WORK_DIR}
work=${2:?usage: recipes/flickr8k_90min.sh FLICKR8K_DIR WORK_DIR}
sat=${SAT:-sat}
source "$(dirname "$0")/stage.sh" # stage NAME COMMAND...: run it, append "NAME SECONDS" to $times
stages_in "$work"
stage prepare "$sat" prepare --dataset flickr8k --data-dir "$data_dir" --out "$work/prepared"
stage features "$sat" features --data "$work/prepared" --out "$work/features" --image-size 448 --grid-size 14 \
  --batch-size 32
common=(--data "$work/prepared" --features "$work/features" --batch-size 100 --checkpoint-every-steps 100)
stage train_xe "$sat" train "${common[@]}" --run-dir "$work/xe" --epochs "${XE_EPOCHS:-8}" --decoder-lr 5e-4 \
  --precision "${PRECISION:-bf16}"
stage train_scst "$sat" train "${common[@]}" --run-dir "$work/scst" --init-from "$work/xe/best" --self-critical \
  --decoder-lr 2e-5 --epochs "${SCST_EPOCHS:-2}" --val-beam-size 7 --val-every-steps 150
export_model() {
  "$sat" export "$work/scst/best" "$work/scst/best" "$work/xe/best" --out "$work/model"
  "$sat" calibrate "$work/model" --data "$work/prepared" --features "$work/features"
}
stage export export_model
stage evaluate "$sat" evaluate "$work/model" --data "$work/prepared" --features "$work/features" --split test \
  --out "$work/test"
