#!/usr/bin/env bash
# Issue 33: bf16 training against fp32 by evidence. The 30-minute recipe's training (recipes/flickr8k_30min.sh:
# 7x7 features of 224 px photos, batch 100, lr 5e-4, one cosine cycle, validation each epoch, best/ by val CIDEr)
# for SEEDS (default 0 1 2) x {fp32, bf16}, everything else equal, then each best/ on test at the defaults (beam 7,
# guidance on). Gathered into results/train_precision_seeds.json: each run's command, wall time, captions/s, val
# (its own greedy validation at the best step) and test metrics; per precision the mean and sample standard
# deviation; bf16 - fp32 per metric, called within noise when it is smaller than the larger of the two standard
# deviations (Welch's t-test beside it).
#   recipes/precision_seeds.sh FLICKR8K_DIR WORK_DIR [EPOCHS] [SEEDS]
# EPOCHS (default 5: the 30-minute recipe's) is the cosine cycle's length. The record: 5 epochs, seeds 0 1 2, run
# on 2026-12-04 as two 1-thread streams side by side (SEEDS "0 1" and "2" in two WORK_DIRs, then gathered over a
# third that links both; its how_run says so); BUCKET=1 with seed 0 made results/train_bucketing_scores.json.
# PREPARED and FEATURES (default WORK_DIR/prepared, WORK_DIR/features) reuse a prepared dataset and a 224 px
# store; THREADS caps each job's threads when another job shares the machine; LOCK (a file) makes each job
# take a shared lock on it, so that a timed benchmark holding it alone waits for the job to end (and the job for it).
# Every run takes random batches (sat train buckets by default) unless BUCKET=1: then --bucket-by-length, to set
# beside a study without it; with one seed the record has no standard deviations and decides nothing.
# Resumable: finished stages are listed in WORK_DIR/stage_seconds.txt and skipped; a training cut short starts
# again (its wall time is part of the record). The precisions alternate (fp32 s0, bf16 s0, fp32 s1, ...), so a
# stop leaves a balanced set. Also run end to end on a 12-photo prepared set at 64 px (PREPARED made beforehand
# with --limit 12, IMAGE_SIZE=64 BATCH=10 LOG_EVERY=1 EPOCHS 1; with BUCKET=1 and one seed on 2026-12-04).
set -euo pipefail
data_dir=${1:?usage: recipes/precision_seeds.sh FLICKR8K_DIR WORK_DIR [EPOCHS] [SEEDS]}
work=${2:?usage: recipes/precision_seeds.sh FLICKR8K_DIR WORK_DIR [EPOCHS] [SEEDS]}
epochs=${3:-5}
read -r -a seeds <<<"${4:-0 1 2}"
sat=${SAT:-sat}
python=${PYTHON:-python}
prepared=${PREPARED:-$work/prepared}
features=${FEATURES:-$work/features}
out=${OUT:-results/train_precision_seeds.json}
# shellcheck disable=SC2206  # empty settings leave no words
run=(${LOCK:+flock -s "$LOCK"} env ${THREADS:+OMP_NUM_THREADS=$THREADS})
source "$(dirname "$0")/stage.sh" # stage_once NAME COMMAND...: run it unless done, append "NAME SECONDS" to $times
stages_kept_in "$work"
[ -f "$prepared/vocab.json" ] || "$sat" prepare --dataset flickr8k --data-dir "$data_dir" --out "$prepared"
stage_once features "${run[@]}" "$sat" features --data "$prepared" --out "$features" \
  --image-size "${IMAGE_SIZE:-224}" --batch-size 32

bucketing=--no-bucket-by-length # random batches unless BUCKET: bucketing is sat train's default
[ -z "${BUCKET:-}" ] || bucketing=--bucket-by-length
# train NAME ARGS...: a training from scratch in WORK_DIR/runs/NAME (what a stopped one left is removed)
train() {
  local name=$1
  shift
  rm -rf "${work:?}/runs/$name"
  "${run[@]}" "$sat" train --data "$prepared" --features "$features" --batch-size "${BATCH:-100}" \
    --checkpoint-every-steps 100 --log-every-steps "${LOG_EVERY:-50}" --epochs "$epochs" --decoder-lr 5e-4 \
    --run-dir "$work/runs/$name" "$bucketing" "$@"
}
for seed in "${seeds[@]}"; do
  for precision in fp32 bf16; do
    name=${precision}_s$seed
    stage_once "train_$name" train "$name" --precision "$precision" --seed "$seed"
    stage_once "test_$name" "${run[@]}" "$sat" evaluate "$work/runs/$name/best" --data "$prepared" \
      --features "$features" --split test --out "$work/test/$name"
  done
done

settings="${BUCKET:+BUCKET=$BUCKET }${THREADS:+THREADS=$THREADS }${PREPARED:+PREPARED=$PREPARED }${FEATURES:+FEATURES=$FEATURES }"
"$python" - "${settings}recipes/precision_seeds.sh $*" "$work" "$epochs" "$out" "$prepared" "$features" "${BATCH:-100}" \
  "${THREADS:-all}" "$bucketing" "${seeds[@]}" <<'EOF'
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from scipy.stats import ttest_ind

from show_attend_tell.records import provenance, write_record

command, work, epochs, out, prepared, features, batch, threads, bucketing, *seeds = sys.argv[1:]
work, epochs = Path(work), int(epochs)
METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
DECIDING = ["BLEU-4", "METEOR", "CIDEr"]  # the issue's three: bf16 is chosen if it is within noise on each
seconds = dict(line.split() for line in (work / "stage_seconds.txt").read_text().splitlines())
record = provenance(command)
# COMMIT: the code's commit when it runs from an exported copy, not from a git checkout
git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
record["commit"] = os.environ.get("COMMIT") or git
record.update(threads_per_job=threads, epochs=epochs, seeds=[int(s) for s in seeds])
record.update(bucket_by_length=bucketing == "--bucket-by-length")
record.update(feature_store_seconds=int(seconds["features"]), runs={})
for precision in ("fp32", "bf16"):
    for seed in seeds:
        name = f"{precision}_s{seed}"
        run_dir = work / "runs" / name
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        best_step = json.loads((run_dir / "best" / "config.json").read_text())["step"]
        val = next(r for r in log if r.get("kind") == "val" and r["step"] == best_step)
        trains = [r for r in log if r.get("kind") == "train"]
        # each epoch's last record: its captions over the epoch's wall time (the validation after it not counted)
        ends = [max((r for r in trains if r["epoch"] == e), key=lambda r: r["step"]) for e in {r["epoch"] for r in trains}]
        test = json.loads((work / "test" / name / "metrics.json").read_text())["results"]["beam7"]
        record["runs"][name] = {
            "precision": precision,
            "seed": int(seed),
            "command": f"sat train --data {prepared} --features {features} --batch-size {batch} "
            f"--checkpoint-every-steps 100 --epochs {epochs} --decoder-lr 5e-4 --run-dir {run_dir} {bucketing} "
            f"--precision {precision} --seed {seed}",
            "evaluate": f"sat evaluate {run_dir}/best --data {prepared} --features {features} --split test "
            f"--out {work / 'test' / name}",
            "train_wall_seconds": int(seconds[f"train_{name}"]),
            "train_captions_per_second": round(statistics.mean(r["captions_per_second"] for r in ends), 1),
            "best_step": best_step,
            "val_greedy": {key: val[key] for key in METRICS},
            "test_beam7": {key: test[key] for key in METRICS},
        }


def values(precision, split, key):
    return [r[split][key] for r in record["runs"].values() if r["precision"] == precision]


record["summary"] = {}
for split in ("val_greedy", "test_beam7"):
    summary = record["summary"][split] = {}
    for key in METRICS:
        fp32, bf16 = values("fp32", split, key), values("bf16", split, key)
        difference = statistics.mean(bf16) - statistics.mean(fp32)
        summary[key] = {"fp32_mean": statistics.mean(fp32), "bf16_mean": statistics.mean(bf16), "bf16_minus_fp32": difference}
        if len(seeds) > 1:  # one seed has no spread to compare with
            welch = ttest_ind(bf16, fp32, equal_var=False)
            summary[key].update(
                fp32_std=statistics.stdev(fp32),
                bf16_std=statistics.stdev(bf16),
                within_noise=abs(difference) < max(statistics.stdev(fp32), statistics.stdev(bf16)),
                welch_t=float(welch.statistic),
                welch_p=float(welch.pvalue),
            )
for key in ("train_wall_seconds", "train_captions_per_second"):
    runs = record["runs"].values()
    record["summary"][key] = {p: statistics.mean(r[key] for r in runs if r["precision"] == p) for p in ("fp32", "bf16")}
record["criterion"] = (
    "bf16 is within noise on a metric when |mean(bf16) - mean(fp32)| < the larger of the two sample standard "
    f"deviations ({len(seeds)} seeds each); Welch's t-test (two-sided) is given beside it"
)
test = record["summary"]["test_beam7"]
record["bf16_within_noise"] = all(test[k]["within_noise"] for k in DECIDING) if len(seeds) > 1 else None
write_record(record, out)
decision = "no decision (one seed)" if record["bf16_within_noise"] is None else record["bf16_within_noise"]
print(f"{out} written; bf16 within noise on test {', '.join(DECIDING)}: {decision}")
EOF
