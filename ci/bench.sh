#!/usr/bin/env bash
# The one command for the side-by-side HelloBench, as root on Debian 12:
#   bash ci/bench.sh [bench_hellobench args, e.g. --images python --trials 3 --net 5:200mbit]
# Sets up like ci/setup.sh, builds/caches the images (debootstrap from this machine's Debian
# mirror, under /var/cache/stargz-bench), builds the Go peer daemon (../shared/tools/go-peer),
# runs the startup benchmark and then the read-path one (READPATH=0 skips it), and draws the
# PNG chart. Output: benchmarks/results/hellobench.{json,png} and hellobench-readpath.json,
# each with a line added to benchmarks/results/history/<name>.jsonl. HB_NAME=NAME writes the
# startup result as NAME.json instead (an A/B of extra modes, a partial run).
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
NAME=${HB_NAME:-hellobench}
# Benchmarks are modules of the benchmarks package, run from the repository root.
.venv/bin/python -m benchmarks.bench_hellobench --go-bin "$GO_BIN" --name "$NAME" "$@"
.venv/bin/python -m benchmarks.hellobench.chart "benchmarks/results/$NAME.json"
if [[ "${READPATH:-1}" == 1 ]]; then
  .venv/bin/python -m benchmarks.bench_hello_readpath --go-bin "$GO_BIN" >/dev/null
  echo "ci/bench: read path -> benchmarks/results/hellobench-readpath.json"
fi
