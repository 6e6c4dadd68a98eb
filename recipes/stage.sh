# Shared by the recipes: `source recipes/stage.sh`, then
#   stages_in DIR           makes DIR and starts DIR/stage_seconds.txt ($times) afresh;
#   stage NAME COMMAND...   runs COMMAND and appends "NAME SECONDS" (its wall time) to $times.
# A resumable recipe keeps its times instead:
#   stages_kept_in DIR      makes DIR and keeps DIR/stage_seconds.txt ($times) from an earlier, stopped run;
#   stage_once NAME COMMAND...   `stage`, unless $times has NAME already (it finished before).
stages_in() {
  mkdir -p "$1"
  times="$1/stage_seconds.txt"
  : >"$times"
}
stages_kept_in() {
  mkdir -p "$1"
  times="$1/stage_seconds.txt"
  touch "$times"
}
stage() {
  local name=$1 start
  shift
  start=$(date +%s)
  "$@"
  echo "$name $(($(date +%s) - start))" | tee -a "$times"
}
stage_once() {
  if grep -qs "^$1 " "$times"; then
    echo "$1: done before ($times)"
  else
    stage "$@"
  fi
}
