#!/usr/bin/env bash
# Issue 16: the Transformer decoder against the paper's LSTM on Flickr8k at equal CPU training time, on the
# same cached features: val and test metrics at the default beam, training captions/s, one-photo latency and
# parameter count, gathered into results/transformer_vs_lstm.json (run on 2026-11-30 with BUDGET_MINUTES 18.5,
# SIDE 224, TRAIN_THREADS=1: see its notes). Also run end to end on a 12-photo prepared set at 64 px
# (BUDGET_MINUTES 0.015, BATCH=10 PROBE_STEPS=2 VALIDATIONS=1 DECODE_REPEATS=1, WORK_DIR/prepared made
# beforehand with --limit 12).
#   recipes/transformer_vs_lstm.sh FLICKR8K_DIR WORK_DIR [BUDGET_MINUTES] [SIDE]
# BUDGET_MINUTES (default 120) of training per decoder; SIDE (default 448: the shipped model's 14x14 grid; 224
# gives 7x7 at a quarter of the cost) is the photos' size for the features.
#
# Equal CPU time: each decoder first trains PROBE_STEPS steps alone on the machine (flock -x on the shared
# bench lock), which gives its captions/s; its budget in steps is then BUDGET_MINUTES x 60 x captions/s / batch,
# rounded down to a multiple of VALIDATIONS (a few steps at most), and it trains from scratch for that many
# steps (--max-steps; --epochs so that the cosine schedule ends near there). The step budget holds even when the
# machine is shared later, and the record keeps the measured captions/s and wall times beside it. Validation
# (greedy, whole val split) runs VALIDATIONS (default 6) times, evenly, the last at the end, and is not counted
# in the budget; best/ is the best val CIDEr.
# TRAIN_THREADS (default: torch's choice) caps the trainings' threads when another job shares the machine;
# the probes always run with torch's default, alone.
set -euo pipefail
data_dir=${1:?usage: recipes/transformer_vs_lstm.sh FLICKR8K_DIR WORK_DIR [BUDGET_MINUTES] [SIDE]}
work=${2:?usage: recipes/transformer_vs_lstm.sh FLICKR8K_DIR WORK_DIR [BUDGET_MINUTES] [SIDE]}
budget_minutes=${3:-120}
side=${4:-448}
grid=$((side / 32))
sat=${SAT:-sat}
python=${PYTHON:-python}
lock=${BENCH_LOCK:-/work/bench.lock}
# overridable for a smoke run on a small prepared dataset (WORK_DIR/prepared made beforehand)
batch=${BATCH:-100}
probe_steps=${PROBE_STEPS:-30}
validations=${VALIDATIONS:-6}
out=${OUT:-results/transformer_vs_lstm.json}
train_captions=30000 # Flickr8k: 6,000 training photos x 5 captions
mkdir -p "$work"
[ -f "$work/prepared/vocab.json" ] || "$sat" prepare --dataset flickr8k --data-dir "$data_dir" --out "$work/prepared"
features="$work/features$side"
# resumable; several hours at 448 px on 2 cores (results/flickr8k_pipeline.json, features_448)
flock -s "$lock" "$sat" features --data "$work/prepared" --out "$features" --image-size "$side" \
  --grid-size "$grid" --batch-size 32

# The two decoders; everything else (data, features, batch, schedule, seed) is shared.
declare -A flags=(
  [lstm]="--decoder lstm --decoder-lr 5e-4"
  # pre-norm Transformer, 3 blocks of 8 heads, D 512: the usual lower dropout and a warm-up
  [transformer]="--decoder transformer --transformer-layers 3 --transformer-heads 8 --dropout 0.1 --decoder-lr 3e-4 --warmup-steps 300"
)
common=(--data "$work/prepared" --features "$features" --batch-size "$batch" --checkpoint-every-steps 100 --seed 0)
# Resumable: a stage whose output is there is skipped (a probe's final record, a training's line "DECODER
# train_seconds" in WORK_DIR/budget_DECODER.txt and its best/ checkpoint, an evaluation's metrics.json, a decode
# benchmark's JSON).
# Both probes first, alone on the machine, so that the trainings after them may share it (TRAIN_THREADS).
for decoder in lstm transformer; do
  # its one record, at step PROBE_STEPS
  grep -qs "\"step\": $probe_steps, .*captions_per_second" "$work/probe_$decoder/log.jsonl" && continue
  rm -rf "${work:?}/probe_$decoder" # a probe cut short starts again
  # shellcheck disable=SC2086  # the flags are words
  flock -x "$lock" "$sat" train "${common[@]}" ${flags[$decoder]} --run-dir "$work/probe_$decoder" \
    --epochs 1 --max-steps "$probe_steps" --log-every-steps "$probe_steps"
done
for decoder in lstm transformer; do
  if ! grep -qs train_seconds "$work/budget_$decoder.txt" || [ ! -f "$work/$decoder/best/config.json" ]; then
    # one record, at the probe's end: its captions over its wall time
    cps=$("$python" -c 'import json, sys; print(json.loads(open(sys.argv[1]).readlines()[-1])["captions_per_second"])' \
      "$work/probe_$decoder/log.jsonl")
    # rounded down to a multiple of the validations, so that the last steps are validated too
    val_every=$("$python" -c "print(max(1, int($budget_minutes * 60 * $cps / $batch) // $validations))")
    steps=$((val_every * validations))
    epochs=$("$python" -c "import math; print(max(1, math.ceil($steps * $batch / $train_captions)))")
    echo "$decoder: $cps captions/s alone -> $steps steps ($epochs epochs) in $budget_minutes minutes" |
      tee "$work/budget_$decoder.txt"
    rm -rf "${work:?}/$decoder" # a training cut short starts again: its wall time is part of the record
    start=$(date +%s)
    # shellcheck disable=SC2086
    flock -s "$lock" env ${TRAIN_THREADS:+OMP_NUM_THREADS=$TRAIN_THREADS} \
      "$sat" train "${common[@]}" ${flags[$decoder]} --run-dir "$work/$decoder" \
      --epochs "$epochs" --max-steps "$steps" --val-every-steps "$val_every" --patience 100
    echo "$decoder train_seconds $(($(date +%s) - start))" >>"$work/budget_$decoder.txt"
  fi
  for split in val test; do
    [ -f "$work/eval_${decoder}_$split/metrics.json" ] ||
      flock -s "$lock" "$sat" evaluate "$work/$decoder/best" --data "$work/prepared" --features "$features" \
        --split "$split" --beam 7 --out "$work/eval_${decoder}_$split"
  done
done
# Timed last, alone (flock -x waits for every other job on the lock): one photo at a time and 32 at once, beam 7,
# encoder included; fp32 for both (the Transformer has no int8 version yet; the LSTM's int8 figures are
# results/decode_speed*.json's).
for decoder in lstm transformer; do
  [ -f "$work/decode_speed_$decoder.json" ] ||
    flock -x "$lock" "$python" benchmarks/decode_speed.py --model "$work/$decoder/best" --beam 7 --no-int8 \
      --repeats "${DECODE_REPEATS:-15}" --out "$work/decode_speed_$decoder.json"
done

"$python" - "$work" "$budget_minutes" "$side" "$out" <<'EOF'
import json, sys
from pathlib import Path

from show_attend_tell.checkpoint import load_model
from show_attend_tell.records import provenance

work, budget, side, out = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
record = provenance("recipes/transformer_vs_lstm.sh " + " ".join(sys.argv[1:]))
record.update(budget_minutes_per_decoder=budget, image_size=side, decoders={})
for decoder in ("lstm", "transformer"):
    model, _, config = load_model(work / decoder / "best", with_encoder=False)
    probe = json.loads(open(work / f"probe_{decoder}" / "log.jsonl").readlines()[-1])
    record["decoders"][decoder] = {
        "model": config["model"],
        "parameters": sum(p.numel() for p in model.decoder.parameters()),
        "budget": (work / f"budget_{decoder}.txt").read_text().splitlines(),
        # the training log's own figure also counts the validations since each epoch began
        "train_captions_per_second_alone": probe["captions_per_second"],
        "best_step": config["step"],
        "val_beam7": json.loads((work / f"eval_{decoder}_val" / "metrics.json").read_text())["results"],
        "test_beam7": json.loads((work / f"eval_{decoder}_test" / "metrics.json").read_text())["results"],
        "decode_speed": json.loads((work / f"decode_speed_{decoder}.json").read_text()),
    }
out.write_text(json.dumps(record, indent=2) + "\n")
print(f"{out} written")
EOF
