#!/usr/bin/env bash
# Fuzz for a bounded time: fuzz/run.sh PYTHON SECONDS [libFuzzer args...] (what `make fuzz` and
# CI run). The targets are FUZZ_TARGETS (default "archive manifest": fuzz/fuzz_archive.py, then
# fuzz/fuzz_manifest.py), run one after the other, SECONDS shared between them. Exit status 0
# when the time ran out with no finding; otherwise 1 after every target ran, and every crash
# input (a Python exception, a timeout, running out of memory) is printed in base64 so a CI log
# is enough to reproduce it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$1 seconds=$2
shift 2
read -r -a targets <<<"${FUZZ_TARGETS:-archive manifest}"
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_$t.py" ] || { echo "fuzz: no target '$t' (have: archive, manifest)" >&2; exit 2; }
done
# Inputs are extracted on tmpfs when there is one; libFuzzer ends the process with C exit(), so
# the scratch directories are removed here rather than by the harnesses.
shm=/dev/shm
[ -d "$shm" ] && [ -w "$shm" ] || shm=${TMPDIR:-/tmp}
scratch=$(mktemp -d "$shm/forgespace-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
failed=()
left=$seconds
for i in "${!targets[@]}"; do
  t=${targets[$i]}
  share=$((left / (${#targets[@]} - i)))  # an even split; the last takes what rounding left
  left=$((left - share))
  out=fuzz/out/$t
  crashes=$out/crashes/$(date +%Y%m%d-%H%M%S)-$$
  mkdir -p "$out/corpus" "$crashes" "$scratch/$t"
  rc=0
  # New interesting inputs go to fuzz/out/TARGET/corpus (the first directory); the committed
  # seeds are only read. -max_total_time bounds the run; the outer timeout is the backstop if
  # libFuzzer hangs.
  echo "fuzz: $t for ${share} s"
  FORGESPACE_FUZZ_DIR=$scratch/$t timeout --kill-after=10 $((share + 60)) \
    "$python" "fuzz/fuzz_$t.py" "$out/corpus" "fuzz/corpus/$t" \
    -max_total_time="$share" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -dict="fuzz/$t.dict" -artifact_prefix="$crashes/" "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    echo "fuzz: $t FAILED (exit $rc); inputs kept in $crashes:" >&2
    for f in "$crashes"/*; do
      [ -f "$f" ] || continue
      echo "== $f ($(stat -c %s "$f") bytes), base64:" >&2
      head -c 65536 "$f" | base64 >&2
    done
  else
    rmdir "$crashes" 2>/dev/null || true
  fi
done
if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz: findings in ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: no finding in ${seconds} s (${targets[*]})"
