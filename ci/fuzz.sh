#!/usr/bin/env bash
# Explore with the fuzz tests (pytest -m fuzz) for a time budget, beyond what CI runs.
#
#   bash ci/fuzz.sh [SECONDS] [pytest arguments...]     (default 600 s, all of tests/)
#
# CI runs each fuzz test with a fixed, derandomized example set (STARGZ_HYPOTHESIS_PROFILE=ci,
# ~1 minute in all). Here every round draws a fresh seed, runs STARGZ_FUZZ_SCALE (default 10)
# times as many examples, and rounds repeat until the budget is spent. A failure stops the
# run and prints the command that finds it again; hypothesis also keeps the failing example
# in .hypothesis/ and replays it first on the next run.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BUDGET=${1:-600}
shift $(( $# > 0 ? 1 : 0 ))
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python
export STARGZ_FUZZ_SCALE=${STARGZ_FUZZ_SCALE:-10}
unset STARGZ_HYPOTHESIS_PROFILE
end=$(( SECONDS + BUDGET ))
round=0
while (( SECONDS < end )); do
  round=$(( round + 1 ))
  seed=$(( RANDOM * 32768 + RANDOM ))
  echo "== round $round: seed $seed, scale $STARGZ_FUZZ_SCALE, $(( end - SECONDS )) s left"
  timeout --signal=INT $(( end - SECONDS + 5 )) "$PY" -m pytest -q -p no:cacheprovider -x \
    -m fuzz --hypothesis-seed="$seed" --hypothesis-show-statistics "${@:-tests}"
  rc=$?
  if (( rc == 124 || (rc == 2 && SECONDS >= end) )); then
    echo "== budget spent during round $round"
    break
  fi
  if (( rc != 0 )); then
    echo "== FAILED in round $round; again with:"
    echo "   STARGZ_FUZZ_SCALE=$STARGZ_FUZZ_SCALE $PY -m pytest -m fuzz --hypothesis-seed=$seed ${*:-tests}"
    exit 1
  fi
done
echo "== $round rounds, no failure"
