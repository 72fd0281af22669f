#!/usr/bin/env bash
# Build (once, cached) the HelloBench root filesystems with debootstrap from this
# machine's configured Debian mirror (read from /etc/apt/sources.list*, never hardcoded):
#   $CACHE/base    debootstrap --variant=minbase bookworm
#   $CACHE/python  base + python3
#   $CACHE/gcc     base + gcc libc6-dev
#   $CACHE/nginx   base + nginx-light
#   $CACHE/node    base + nodejs (Debian's package)
# CACHE defaults to /var/cache/stargz-bench. A tree is rebuilt only if its .done stamp is missing.
set -euo pipefail
CACHE=${STARGZ_BENCH_CACHE:-/var/cache/stargz-bench}
SUITE=${SUITE:-bookworm}
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$CACHE"

mirror() {
  local u
  u=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null |
      grep -E 'debian/?( |$)' | grep -v security | head -1 |
      sed -E 's/^URIs:[[:space:]]*//; s/^deb (\[[^]]*\] )?//; s/[[:space:]].*$//')
  [[ -n $u ]] || { echo "rootfs.sh: no Debian mirror in /etc/apt/sources.list*" >&2; exit 1; }
  echo "$u"
}

command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null

if [[ ! -f $CACHE/base.done ]]; then
  rm -rf "$CACHE/base"
  M=$(mirror)
  echo "rootfs.sh: debootstrap $SUITE from $M" >&2
  debootstrap --variant=minbase "$SUITE" "$CACHE/base" "$M" >"$CACHE/base.log" 2>&1
  touch "$CACHE/base.done"
fi

build() { # name packages...
  local name=$1; shift
  [[ -f $CACHE/$name.done ]] && return 0
  rm -rf "$CACHE/$name"
  cp -a "$CACHE/base" "$CACHE/$name"
  cp /etc/resolv.conf "$CACHE/$name/etc/resolv.conf" 2>/dev/null || true
  printf '#!/bin/sh\nexit 101\n' >"$CACHE/$name/usr/sbin/policy-rc.d"  # no service starts
  chmod 755 "$CACHE/$name/usr/sbin/policy-rc.d"
  {
    chroot "$CACHE/$name" apt-get update -q
    chroot "$CACHE/$name" apt-get install -y -q --no-install-recommends "$@"
    chroot "$CACHE/$name" apt-get clean
  } >"$CACHE/$name.log" 2>&1
  rm -rf "$CACHE/$name/var/lib/apt/lists/"* "$CACHE/$name/usr/sbin/policy-rc.d"
  touch "$CACHE/$name.done"
}

build python python3
build gcc gcc libc6-dev
build nginx nginx-light
build node nodejs
if [[ ! -f $CACHE/gcc/hello.c ]]; then
  printf '#include <stdio.h>\nint main(void){printf("hello\\n");return 0;}\n' >"$CACHE/gcc/hello.c"
fi
echo "rootfs.sh: ready in $CACHE" >&2
