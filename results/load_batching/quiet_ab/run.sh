#!/usr/bin/env bash
# interleaved A/B of benchmarks/load.py: the server before batching (f1ba18e) against main, 1 and 8 clients
set -e
out=${OUT:-/tmp/load_ab}; mkdir -p $out
cd /work/main
for round in 1 2; do
  for clients in 8 1; do
    requests=200; [ $clients = 1 ] && requests=60
    for code in before after; do
      extra=(); [ $code = before ] && extra=(--code /tmp/before_serve)
      .venv/bin/python benchmarks/load.py --requests $requests --clients $clients "${extra[@]}" \
        --out $out/${code}_${clients}_r${round}.json > $out/${code}_${clients}_r${round}.log 2>&1
      echo "$code $clients $round $(date +%T)"
    done
  done
done
