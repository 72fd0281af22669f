#!/usr/bin/env bash
# The one command for the side-by-side HelloBench (issue 5), as root on Debian 12:
#   bash ci/bench.sh [bench_hellobench.py args, e.g. --images python --trials 3 --net 5:200mbit]
# Sets up like ci/setup.sh, builds/caches the images (debootstrap from this machine's Debian
# mirror, under /var/cache/stargz-bench), builds the Go peer daemon (../shared/tools/go-peer),
# runs the startup benchmark and then the read-path one (READPATH=0 skips it), and draws the
# PNG chart. Output: benchmarks/results/hellobench-<UTC date-time>.{json,png} and
# benchmarks/results/hellobench-readpath-<UTC date-time>.json (HB_OUT=path.json overrides the first).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${STARGZ_SHARED:-}
for d in "$SHARED" "$ROOT/../shared" /work/shared; do
  if [ -n "$d" ] && [ -d "$d/tools" ]; then SHARED=$d; break; fi
done
export STARGZ_SHARED="$SHARED"
cd "$ROOT"
bash ci/setup.sh
# matplotlib draws the chart (the `bench` extra).
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q -e ".[bench]"
bash benchmarks/hellobench/rootfs.sh
bash "$SHARED/tools/go-peer/build.sh" >/dev/null
GO_BIN=${PEER_DIR:-/tmp/peer}/bin/containerd-stargz-grpc
STAMP=$(date -u +%Y%m%d-%H%M)
OUT=${HB_OUT:-benchmarks/results/hellobench-$STAMP.json}
.venv/bin/python benchmarks/bench_hellobench.py --go-bin "$GO_BIN" --out "$OUT" "$@"
.venv/bin/python benchmarks/hellobench/chart.py "$OUT"
if [[ "${READPATH:-1}" == 1 ]]; then
  .venv/bin/python benchmarks/bench_hello_readpath.py --go-bin "$GO_BIN" \
    --out "${OUT%.json}-readpath.json" >/dev/null
  echo "ci/bench: read path -> ${OUT%.json}-readpath.json"
fi
