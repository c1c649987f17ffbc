#!/usr/bin/env bash
# GPU session 4 driver. Each device call runs `bash benchmarks/sessions/gpu4_run.sh PART [WAIT_S]`: it waits
# for the part the previous call started, starts gpu4_PART.sh in the background (setsid: it goes on after this
# command returns, within the machine's 30-minute hold, so the GPUs work while the results are read), waits up
# to WAIT_S seconds in all, and returns every log under $R as $OUT/results.tgz. PART "-" only waits and collects.
set -uo pipefail
R=/tmp/s4/res; OUT=${OUT:-/tmp/out}; mkdir -p "$R" "$OUT"
PART=${1:--}; WAIT=${2:-540}; T0=$(date +%s)
running() { [ -f "$R/pid" ] && kill -0 "$(cat "$R/pid")" 2>/dev/null; }
wait_part() { while running && [ $(( $(date +%s) - T0 )) -lt "$WAIT" ]; do sleep 5; done; }
wait_part
if [ "$PART" != - ] && ! running; then
  SCRIPT=benchmarks/sessions/gpu4_$PART.sh; [ -f "$PART" ] && SCRIPT=$PART && PART=$(basename "$PART" .sh)
  setsid bash "$SCRIPT" > "$R/$PART.out" 2>&1 < /dev/null &
  echo $! > "$R/pid"; echo "started $PART at $(date +%T)"
  wait_part
fi
running && echo "still running: pid $(cat "$R/pid")"
cat "$R/timings.txt" 2>/dev/null; for f in "$R"/*.out; do echo "== $f"; grep -vE "^\s*$|it/s\]|s/it\]" "$f" | tail -n 25 | cut -c1-400; done
tar -C "$R" -czf "$OUT/results.tgz" . && ls -la "$OUT"
