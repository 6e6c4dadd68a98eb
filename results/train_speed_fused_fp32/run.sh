#!/usr/bin/env bash
# interleaved A/B of benchmarks/train_speed.py at the product defaults (auto precision, bucketed, batch 64),
# 5057da0 (before the fused teacher-forced pass) vs HEAD, on random grids of a prepared Flickr8k's captions
out=results/train_speed_fused_fp32; mkdir -p $out
for round in 1 2; do
  for grid in 224 448; do
    for tree in before after; do
      dir=/work/main; [ $tree = before ] && dir=/work/wt-5057
      (cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python benchmarks/train_speed.py --data /work/data/f8k --random-features --image-size $grid \
        --sources features --precisions auto --batching length --batch-captions 64 \
        --repeats ${REPEATS:-15} --warmup 2 --no-phases --out $out/${tree}_${grid}_r${round}.json > $out/${tree}_${grid}_r${round}.log 2>&1)
      echo "$tree $grid $round done $(date +%T)"
    done
  done
done
