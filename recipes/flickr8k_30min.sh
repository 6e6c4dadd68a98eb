#!/usr/bin/env bash
# Raw Flickr8k photos to a model past the paper's best BLEU-4 (hard attention, 21.3) within 30 minutes on a
# 2-core CPU, features included: prepare, cache 7x7 features at 224 px with the encoder in its fastest
# precision that keeps the captions (`--encoder-precision auto`: bf16 where the CPU has it), one 5-epoch cosine
# cycle of cross-entropy, and the test-split evaluation at the default beam. Prints and records each stage's
# wall time (results/flickr8k_30min.json holds a recorded run).
#   recipes/flickr8k_30min.sh FLICKR8K_DIR WORK_DIR      (FLICKR8K_DIR holds Flickr8k.token.txt and images/)
set -euo pipefail
data_dir=${1:?usage: recipes/flickr8k_30min.sh FLICKR8K_DIR WORK_DIR}
work=${2:?usage: recipes/flickr8k_30min.sh FLICKR8K_DIR WORK_DIR}
sat=${SAT:-sat}
source "$(dirname "$0")/stage.sh"  # stage NAME COMMAND...: run it, append "NAME SECONDS" to $times
stages_in "$work"
stage prepare "$sat" prepare --dataset flickr8k --data-dir "$data_dir" --out "$work/prepared"
stage features "$sat" features --data "$work/prepared" --out "$work/features" --batch-size 32
stage train "$sat" train --data "$work/prepared" --features "$work/features" --batch-size 100 \
  --checkpoint-every-steps 100 --run-dir "$work/xe" --epochs 5 --decoder-lr 5e-4
stage evaluate "$sat" evaluate "$work/xe/best" --data "$work/prepared" --features "$work/features" \
  --split test --out "$work/test"
