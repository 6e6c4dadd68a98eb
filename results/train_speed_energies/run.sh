#!/usr/bin/env bash
# interleaved A/B of train_speed before (72a1c85) and after (prefix views) the change
set -e
out=/tmp/ts_fused; mkdir -p $out
for round in 1 2; do
  for side in 448 224; do
    for tree in before after; do
      dir=/work/main; [ $tree = before ] && dir=/tmp/before_fused
      (cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python benchmarks/train_speed.py --data /work/data/f8k --random-features \
        --image-size $side --limit 300 --sources features --precisions fp32 bf16 --batch-captions 64 \
        --repeats 4 --warmup 1 --no-phases --out $out/${tree}_${side}_r${round}.json > $out/${tree}_${side}_r${round}.log 2>&1)
      echo "$tree $side $round done $(date +%T)"
    done
  done
done
