#!/usr/bin/env bash
# The fault matrix, as root on Debian 12:
#   bash ci/faults.sh [--outage SEC] [--reads N] [--only NAME ...] [--out FILE]
# Reads a lazily mounted layer through our daemon while the registry resets connections,
# answers 5xx/429, stalls, cuts or flips bodies, answers the wrong range, lets tokens and
# redirect signatures expire or goes away for a minute, and while the cache disk is full or
# read-only and containerd restarts. Prints the table and writes benchmarks/results/faults.json
# (or --out FILE); exits 1 if a fault broke an invariant. Sets the machine up first unless
# PYTHON names an interpreter that already has the dependencies.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  bash ci/setup.sh
  PYTHON=$ROOT/.venv/bin/python
fi
SHARED=${STARGZ_SHARED:-}
for d in "$SHARED" "$ROOT/../shared" /work/shared; do
  if [ -n "$d" ] && [ -d "$d/fixtures" ]; then SHARED=$d; break; fi
done
[ -d "$SHARED/fixtures" ] || { echo "faults: fixtures not found (set STARGZ_SHARED)" >&2; exit 1; }
export STARGZ_SHARED="$SHARED"
# this checkout's package, whatever the interpreter has installed
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$ROOT/.tools/bin:$ROOT/.venv/bin:$PATH"
exec "$PYTHON" -m benchmarks.bench_faults "$@"
