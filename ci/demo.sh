#!/usr/bin/env bash
# The main job, end to end on this machine: set up, convert the bundled busybox and
# corner-case images to eStargz and zstd:chunked with our converter, check every
# converted layer with our reader (random-access extract, every chunk verified) and
# with the Go reference reader, and print sizes and throughput.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash ci/setup.sh
SHARED=${STARGZ_SHARED:-}
for d in "$SHARED" "$ROOT/../shared" /work/shared; do
  if [ -n "$d" ] && [ -d "$d/fixtures" ]; then SHARED=$d; break; fi
done
[ -d "$SHARED/fixtures" ] || { echo "demo: fixtures not found (set STARGZ_SHARED)" >&2; exit 1; }
export STARGZ_SHARED="$SHARED"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m ci.demo "$ROOT/.tools/bin/esgz-verify"
