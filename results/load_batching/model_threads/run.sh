#!/bin/bash
# issue 31: two model threads (working tree) against one (82c5856), interleaved
# run from the checkout under test: BASE=/path/to/a/worktree/of/82c5856 (with .venv linked) bash run.sh
set -x
for i in 1 2; do
  for v in new base; do
    d=$PWD; [ $v = base ] && d=$BASE
    (cd $d && flock -x /tmp/bench.lock .venv/bin/python benchmarks/hostile_load.py --rounds 2 --out /tmp/hostile_${v}_$i.json > /tmp/hostile_${v}_$i.log 2>&1)
  done
done
for i in 1 2; do
  for v in new base; do
    d=$PWD; [ $v = base ] && d=$BASE
    (cd $d && flock -x /tmp/bench.lock .venv/bin/python benchmarks/load.py --requests 60 --clients 1 --out /tmp/load_${v}_1_$i.json > /tmp/load_${v}_1_$i.log 2>&1)
    (cd $d && flock -x /tmp/bench.lock .venv/bin/python benchmarks/load.py --requests 200 --clients 8 --out /tmp/load_${v}_8_$i.json > /tmp/load_${v}_8_$i.log 2>&1)
  done
done
echo done > /tmp/finished
