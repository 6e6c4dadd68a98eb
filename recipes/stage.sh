# Shared by the recipes: `source recipes/stage.sh` after setting $times (a file), then
#   stage NAME COMMAND...   runs COMMAND and appends "NAME SECONDS" (its wall time) to $times.
stage() {
  local name=$1 start
  shift
  start=$(date +%s)
  "$@"
  echo "$name $(($(date +%s) - start))" | tee -a "$times"
}
