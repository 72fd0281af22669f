#!/usr/bin/env bash
# Regenerate the Python code for containerd's APIs (Snapshots, which the daemon serves;
# Content, Images, Leases and Diff, which `stargz rpull` calls), our own Status and Pull APIs
# (stargz.v1) and the subset of the Kubernetes CRI API (runtime.v1) from proto/.
#
#   scripts/gen_proto.sh [OUTDIR]     (default: src/stargz/service/proto)
#
# The generated code is committed; tests/snapshot/test_proto_current.py runs this script
# into a temp dir and fails if the result differs from what is committed.
# Needs grpcio-tools (the `test` extra). PYTHON selects the interpreter.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/src/stargz/service/proto}
py=${PYTHON:-python3}
pkg=stargz.service.proto

mkdir -p "$out"
cd "$top/proto"
"$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  containerd/types/mount.proto \
  containerd/types/descriptor.proto \
  containerd/services/snapshots/v1/snapshots.proto \
  containerd/services/content/v1/content.proto \
  containerd/services/images/v1/images.proto \
  containerd/services/leases/v1/leases.proto \
  containerd/services/diff/v1/diff.proto \
  stargz/v1/status.proto \
  stargz/v1/pull.proto \
  k8s/cri/runtime/v1/api.proto

# protoc writes absolute imports of the proto package ("from containerd.types import
# mount_pb2"); make them imports inside our package.
find "$out/containerd" "$out/stargz" "$out/k8s" -name '*.py' -o -name '*.pyi' | sort | while read -r f; do
  sed -i -E "s/^from (containerd|stargz|k8s)\./from $pkg.\1./; s/^import (containerd|stargz|k8s)\./import $pkg.\1./" "$f"
done

for d in "$out" "$out/containerd" "$out/containerd/types" "$out/containerd/services" \
  "$out"/containerd/services/*/ "$out"/containerd/services/*/v1 \
  "$out/stargz" "$out/stargz/v1" \
  "$out/k8s" "$out/k8s/cri" "$out/k8s/cri/runtime" "$out/k8s/cri/runtime/v1"; do
  : >"$d/__init__.py"
done
"$py" -c 'import grpc_tools, importlib.metadata as m; print("grpcio-tools", m.version("grpcio-tools"))' \
  >"$out/GENERATED_BY"
