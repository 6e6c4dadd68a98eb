#!/usr/bin/env bash
# MS COCO 2014 with Karpathy's split (113,287 train incl. restval, 5,000 val, 5,000 test images), the seed's
# dataset and encoder (ResNet-101, 448 px, the 14x14 grid): from the official caption files and image folders to
# the test split's metrics. Prints and records each stage's wall time in WORK_DIR/stage_seconds.txt.
#   recipes/coco2014.sh COCO_DIR WORK_DIR
# COCO_DIR holds what the COCO site's zips unpack to, and Karpathy's split lists (README, Datasets):
#   annotations/captions_train2014.json annotations/captions_val2014.json train2014/ val2014/
#   karpathy_train_images.txt karpathy_val_images.txt karpathy_test_images.txt
# ResNet-101's weights: `sat weights add resnet101 resnet101-63fe2227.pth` once (torchvision's file, checked
# against its published checksum), or ENCODER=resnet50 for the offline weights.
#
# Several GPUs: LAUNCH="torchrun --nproc_per_node=8 -m show_attend_tell.cli" runs `features` and `train` on
# them (each rank fills its own shard of the store, then trains on its share of each batch; NCCL, fp16 autocast).
# Several machines: the same with torchrun's --nnodes/--node_rank/--rdzv_endpoint; without a shared disk, move
# every machine's WORK_DIR/features/*-of-*.npy files into one WORK_DIR/features before training (the shards
# are the store, nothing is rewritten).
#
# Cost per stage on COCO, from per-image costs measured here and the assumptions they state
# (recipes/coco2014_costs.py -> results/coco2014_costs.json; README, "COCO 2014 at scale"):
#   prepare          CPU minutes; prepared/ about 60 MB
#   features         ResNet-101 forward over 123,287 photos at 448 px; store 99 GB in fp16 (198 GB fp32)
#   train_xe         XE_EPOCHS epochs of 566,435 captions, with a beam-1 validation of 5,000 images each
#   train_scst       SCST_EPOCHS epochs of 113,287 images x 5 samples, same validation
#   evaluate         5,000 test images at beams 3 and 7
# Environment: ENCODER (resnet101), IMAGE_SIZE (448), XE_EPOCHS (20), SCST_EPOCHS (10), BATCH_SIZE (500 captions),
# SCST_BATCH_SIZE (250), FEATURE_BATCH (64), LAUNCH, SAT (sat), EXTRA_TRAIN (more `sat train` flags, e.g. for tests).
set -euo pipefail
coco=${1:?usage: recipes/coco2014.sh COCO_DIR WORK_DIR}
work=${2:?usage: recipes/coco2014.sh COCO_DIR WORK_DIR}
read -ra sat <<<"${SAT:-sat}"
read -ra launch <<<"${LAUNCH:-${SAT:-sat}}"
read -ra extra <<<"${EXTRA_TRAIN:-}"
encoder=${ENCODER:-resnet101}
image_size=${IMAGE_SIZE:-448}
source "$(dirname "$0")/stage.sh" # stage NAME COMMAND...: run it, append "NAME SECONDS" to $times
stages_in "$work"
for file in annotations/captions_train2014.json annotations/captions_val2014.json karpathy_train_images.txt \
  karpathy_val_images.txt karpathy_test_images.txt; do
  [ -f "$coco/$file" ] || { echo "recipes/coco2014.sh: $coco/$file is missing (see the README, Datasets)" >&2; exit 2; }
done
stage prepare "${sat[@]}" prepare --dataset coco --data-dir "$coco/annotations" --images "$coco" --out "$work/prepared" \
  --split-file "train=$coco/karpathy_train_images.txt" --split-file "val=$coco/karpathy_val_images.txt" \
  --split-file "test=$coco/karpathy_test_images.txt"
# resumable: rerunning the recipe continues an interrupted store (per shard) instead of starting again
stage features "${launch[@]}" features --data "$work/prepared" --out "$work/features" --encoder "$encoder" \
  --image-size "$image_size" --batch-size "${FEATURE_BATCH:-64}"
# The store is read from disk batch by batch when it does not fit in half the memory (--feature-loading auto).
train=(--data "$work/prepared" --features "$work/features" --checkpoint-every-steps 1000 "${extra[@]}")
[ -f "$work/xe/last/state.json" ] && xe=(--resume "$work/xe") ||
  xe=("${train[@]}" --run-dir "$work/xe" --epochs "${XE_EPOCHS:-20}" --batch-size "${BATCH_SIZE:-500}" --decoder-lr 4e-4)
stage train_xe "${launch[@]}" train "${xe[@]}"
[ -f "$work/scst/last/state.json" ] && scst=(--resume "$work/scst") ||
  scst=("${train[@]}" --run-dir "$work/scst" --init-from "$work/xe/best" --self-critical --epochs "${SCST_EPOCHS:-10}" \
    --batch-size "${SCST_BATCH_SIZE:-250}" --decoder-lr 2e-5 --scst-xe-weight 0.2)
stage train_scst "${launch[@]}" train "${scst[@]}"
stage evaluate "${sat[@]}" evaluate "$work/scst/best" --data "$work/prepared" --features "$work/features" --split test \
  --beam 3 7 --out "$work/test"
stage evaluate_xe "${sat[@]}" evaluate "$work/xe/best" --data "$work/prepared" --features "$work/features" \
  --split test --beam 3 7 --out "$work/test_xe"
