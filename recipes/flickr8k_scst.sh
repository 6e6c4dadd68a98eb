#!/usr/bin/env bash
# Issue 30: self-critical sequence training (CIDEr-D reward, Rennie et al. 2017; the leave-one-out baseline of Luo
# 2020) of the cross-entropy model on Flickr8k, with the study of what decides it: the shipped model from the
# cross-entropy one. Every run starts from the same cross-entropy weights (INIT), samples 5 or 10 captions for each
# of 20 photos a step (batch 100), validates on the 1,000 val photos at beam 7 (the default), keeps best/ by CIDEr.
#   INIT=XE_MODEL recipes/flickr8k_scst.sh FLICKR8K_DIR WORK_DIR      (run from the repository root)
# INIT is the cross-entropy model: recipes/flickr8k.sh's WORK_DIR/shipped, or the model shipped before issue 30:
#   git archive 4450de3 show_attend_tell/pretrained/flickr8k | tar -x -C /tmp/xe   (INIT=/tmp/xe/show_attend_tell/...)
# Stages:
#   main     the shipped run (named six_epochs in results/flickr8k_scst/six_epochs/): LR (default 2e-5),
#            SAMPLES captions a photo (default 10), no word twice in samples, baselines and validations
#            (--once-words), XE_WEIGHT x cross-entropy mixed in (default 0), EPOCHS (default 6, one cosine cycle), a
#            validation every 150 steps and one of the starting weights (--val-at-start), stopped after 4
#            validations without a new best;
#   study    (STUDY=1) the study of results/flickr8k_scst/study.json (whose names are longer: main4 is main_lr2e-5
#            there), every run on a STUDY_EPOCHS (default 4) schedule: main4, the first long run (5 samples a
#            photo, words may repeat); then the sweep, 150 steps each (main4's schedule cut there) with a
#            validation at 75 and 150: lr 5e-5 and 5e-6, the greedy baseline, 0.2 x cross-entropy, samples cut at
#            12 tokens, CIDEr-D's document frequencies from each batch's references, 10 samples a photo; then two
#            more of main4's length: samples cut at 12 tokens with per-batch document frequencies, and lr 1e-5;
#   export   the mean of main/best's weights three times and INIT's twice (3/5 self-critical, 2/5 cross-entropy:
#            chosen on val at beam 7 over the 2:1 mean, a 2:1 mean of the snapshots of the run's last 450 steps and
#            a 1:1:1 mean with main4's best), fp16, in WORK_DIR/model, with its int8 decoder calibrated and checked
#            on val (`sat calibrate --check val`); then val and test at the default beam from the 448 px store,
#            and INIT on val (the captions before and after).
# Then recipes/scst_study.py gathers the runs into OUT (default results/flickr8k_scst/six_epochs/study.json and
# curves.png; with STUDY=1 every run), with the two models' val captions compared (statistics, most common
# captions, photos whose caption changed).
# Resumable: finished stages are listed in WORK_DIR/stage_seconds.txt and skipped; a training stopped midway
# continues from its last checkpoint (`sat train --resume`), bit for bit. THREADS caps each job's threads (the
# study ran its runs in two one-thread streams side by side, main on two threads alone); PREPARED and FEATURES
# reuse a prepared Flickr8k and its 14x14 store of 448 px photos (otherwise made in WORK_DIR, about 20 minutes).
set -euo pipefail
data_dir=${1:?usage: recipes/flickr8k_scst.sh FLICKR8K_DIR WORK_DIR}
work=${2:?usage: recipes/flickr8k_scst.sh FLICKR8K_DIR WORK_DIR}
sat=${SAT:-sat}
python=${PYTHON:-python}
init=${INIT:?set INIT to the cross-entropy model (see the top of this file)}
prepared=${PREPARED:-$work/prepared}
features=${FEATURES:-$work/features448}
out=${OUT:-results/flickr8k_scst/six_epochs}
# shellcheck disable=SC2206  # empty settings leave no words
run=(env ${THREADS:+OMP_NUM_THREADS=$THREADS})
source "$(dirname "$0")/stage.sh" # stage_once NAME COMMAND...: run it unless done, append "NAME SECONDS" to $times
stages_kept_in "$work"
[ -f "$prepared/vocab.json" ] || "$sat" prepare --dataset flickr8k --data-dir "$data_dir" --out "$prepared"
[ -f "$features/features.json" ] ||
  stage_once features "${run[@]}" "$sat" features --data "$prepared" --out "$features" --image-size 448 \
    --grid-size 14 --batch-size 32

# scst NAME ARGS...: a self-critical run in WORK_DIR/runs/NAME from INIT, or the rest of a stopped one
scst() {
  local name=$1 dir=$work/runs/$1
  shift
  if [ -f "$dir/last/state.json" ]; then
    "${run[@]}" "$sat" train --resume "$dir"
  else
    rm -rf "$dir"
    "${run[@]}" "$sat" train --data "$prepared" --features "$features" --init-from "$init" --self-critical \
      --batch-size "${BATCH:-100}" --epochs "${EPOCHS:-6}" --val-beam-size 7 --log-every-steps "${LOG_EVERY:-10}" \
      --checkpoint-every-steps 50 --run-dir "$dir" "$@"
  fi
}
stage_once main scst main --decoder-lr "${LR:-2e-5}" --scst-samples "${SAMPLES:-10}" --once-words \
  --scst-xe-weight "${XE_WEIGHT:-0}" --val-every-steps 150 --val-at-start --patience 4
if [ "${STUDY:-0}" = 1 ]; then
  four=(--epochs "${STUDY_EPOCHS:-4}") # the study's schedule (the last --epochs given counts)
  stage_once main4 scst main4 --decoder-lr 2e-5 "${four[@]}" --val-every-steps 150 --val-at-start --patience 4
  short=("${four[@]}" --val-every-steps 75 --max-steps 150)
  stage_once lr5e-5 scst lr5e-5 --decoder-lr 5e-5 "${short[@]}"
  stage_once lr5e-6 scst lr5e-6 --decoder-lr 5e-6 "${short[@]}"
  stage_once greedy scst greedy --decoder-lr 2e-5 --scst-baseline greedy "${short[@]}"
  stage_once xe0.2 scst xe0.2 --decoder-lr 2e-5 --scst-xe-weight 0.2 "${short[@]}"
  stage_once maxlen12 scst maxlen12 --decoder-lr 2e-5 --scst-max-length 12 "${short[@]}"
  stage_once dfbatch scst dfbatch --decoder-lr 2e-5 --scst-document-frequency batch "${short[@]}"
  stage_once samples10 scst samples10 --decoder-lr 2e-5 --scst-samples 10 "${short[@]}"
  long=("${four[@]}" --val-every-steps 150 --patience 4) # full length, like main4
  stage_once combo scst combo --decoder-lr 2e-5 --scst-max-length 12 --scst-document-frequency batch "${long[@]}"
  stage_once lr1e-5 scst lr1e-5 --decoder-lr 1e-5 "${long[@]}"
fi
export_model() { # the 3:2 mean of main/best and INIT, its int8 decoder calibrated and checked on val (int8 stays
  # the default only within 0.5 CIDEr of fp32: results/flickr8k_scst/six_epochs/int8_check.json)
  local best=$work/runs/main/best
  rm -rf "$work/model"
  "$sat" export "$best" "$best" "$best" "$init" "$init" --out "$work/model"
  "${run[@]}" "$sat" calibrate "$work/model" --data "$prepared" --features "$features" --check val
}
stage_once export export_model
evaluate() { # evaluate MODEL SPLIT OUT: at the default beam, from the store
  "${run[@]}" "$sat" evaluate "$1" --data "$prepared" --features "$features" --split "$2" --beam 7 --out "$3"
}
stage_once evaluate_val evaluate "$work/model" val "$work/val"
stage_once evaluate_val_start evaluate "$init" val "$work/val_start"
stage_once evaluate_test evaluate "$work/model" test "$work/test"
"$python" recipes/scst_study.py "$work/runs" "$out" --start-from main \
  --captions "start=$work/val_start/captions_val_beam7.json" --captions "scst=$work/val/captions_val_beam7.json" \
  --command "${THREADS:+THREADS=$THREADS }${STUDY:+STUDY=$STUDY }recipes/flickr8k_scst.sh $*"
