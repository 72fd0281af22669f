#!/usr/bin/env bash
# Install everything a fresh Debian 12 machine needs to build, test and run stargz:
# system packages (containerd, runc, registry, FUSE, the Go reference tools and the
# native libraries the Cython core links), a venv at .venv with the package in
# editable mode, and the Go reference reader built from Debian's Go sources.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PKGS=(
  fuse3 pkg-config
  containerd runc docker-registry skopeo
  stargz-snapshotter golang-go golang-github-containerd-stargz-snapshotter-dev
  libisal-dev libzstd-dev libssl-dev
  python3-venv python3-dev gcc curl jq openssl
  systemd
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "ci/setup: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian containerd/registry packages start system services; tests run their own.
for svc in containerd docker-registry; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

PY=${PYTHON:-python3}
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
"$ROOT/.venv/bin/pip" install -q --upgrade pip setuptools wheel
"$ROOT/.venv/bin/pip" install -q -e "$ROOT[test]"

# The Go reference reader (../shared/tools/esgz-verify) built into .tools/bin.
SHARED=""
for d in "${STARGZ_SHARED:-}" "$ROOT/../shared" /work/shared; do
  if [ -n "$d" ] && [ -d "$d/tools/esgz-verify" ]; then SHARED=$d; break; fi
done
if [ -n "$SHARED" ] && [ ! -x "$ROOT/.tools/bin/esgz-verify" ]; then
  bash "$SHARED/tools/esgz-verify/build.sh" "$ROOT/.tools/bin/esgz-verify" >/dev/null
fi
echo "ci/setup: ready ($ROOT/.venv)"
