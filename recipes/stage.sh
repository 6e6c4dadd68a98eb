# Shared by the recipes: `source recipes/stage.sh`, then
#   stages_in DIR           makes DIR and starts DIR/stage_seconds.txt ($times) afresh;
#   stage NAME COMMAND...   runs COMMAND and appends "NAME SECONDS" (its wall time) to $times.
stages_in() {
  mkdir -p "$1"
  times="$1/stage_seconds.txt"
  : >"$times"
}
stage() {
  local name=$1 start
  shift
  start=$(date +%s)
  "$@"
  echo "$name $(($(date +%s) - start))" | tee -a "$times"
}
