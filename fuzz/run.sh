#!/usr/bin/env bash
# Fuzz the archive reader for a bounded time: fuzz/run.sh PYTHON SECONDS [libFuzzer args...]
# (what `make fuzz` and CI run). Exit status 0 when the time ran out with no finding; otherwise
# libFuzzer's own (a Python exception, a timeout, running out of memory) and every crash input
# is printed in base64 so a CI log is enough to reproduce it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$1 seconds=$2
shift 2
out=fuzz/out
crashes=$out/crashes/$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$out/corpus" "$crashes"
# Inputs are extracted on tmpfs when there is one; libFuzzer ends the process with C exit(), so
# the scratch directory is removed here rather than by the harness.
shm=/dev/shm
[ -d "$shm" ] && [ -w "$shm" ] || shm=${TMPDIR:-/tmp}
scratch=$(mktemp -d "$shm/forgespace-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
rc=0
# New interesting inputs go to $out/corpus (the first directory); the committed seeds are only
# read. -max_total_time bounds the run; the outer timeout is the backstop if libFuzzer hangs.
FORGESPACE_FUZZ_DIR=$scratch timeout --kill-after=10 $((seconds + 60)) \
  "$python" fuzz/fuzz_archive.py "$out/corpus" fuzz/corpus/archive \
  -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -dict=fuzz/archive.dict -artifact_prefix="$crashes/" "$@" || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "fuzz: FAILED (exit $rc); inputs kept in $crashes:" >&2
  for f in "$crashes"/*; do
    [ -f "$f" ] || continue
    echo "== $f ($(stat -c %s "$f") bytes), base64:" >&2
    head -c 65536 "$f" | base64 >&2
  done
  exit 1
fi
rmdir "$crashes" 2>/dev/null || true
echo "fuzz: no finding in ${seconds} s"
