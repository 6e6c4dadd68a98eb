#!/usr/bin/env bash
# interleaved A/B of train_speed: before (HEAD) and after (fused soft teacher-forced pass), at the defaults
set -e
out=/tmp/ts_fused; mkdir -p $out
pid=$(pgrep -f "samples10" | head -1 || true)
for round in 1 2; do
  for grid in 224 448; do
    for tree in before after; do
      dir=/work/main; [ $tree = before ] && dir=/work/wt-before
      (cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python benchmarks/train_speed.py --data /work/data/f8k --features /work/data/f8k_features$grid \
        --sources features --precisions auto --batching length --batch-captions 64 \
        --repeats ${REPEATS:-12} --warmup 2 --no-phases --out $out/${tree}_${grid}_r${round}.json > $out/${tree}_${grid}_r${round}.log 2>&1)
      echo "$tree $grid $round done $(date +%T)"
    done
  done
done
