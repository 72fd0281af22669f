"""The committed generated code is current, and the protos match containerd's wire facts."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from stargz.service.proto.containerd.types import mount_pb2

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "src" / "stargz" / "service" / "proto"


def test_regenerating_yields_the_committed_files(tmp_path):
    out = tmp_path / "proto"
    p = subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_proto.sh"), str(out)],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHON=sys.executable),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, f"gen_proto.sh failed (needs grpcio-tools):\n{p.stderr}"
    produced = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(GENERATED)
        for p in GENERATED.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert produced == committed
    stale = [str(p) for p in produced if not filecmp.cmp(out / p, GENERATED / p, shallow=False)]
    assert not stale, (
        f"generated code differs from a fresh run of scripts/gen_proto.sh: {stale} "
        f"(committed: {(GENERATED / 'GENERATED_BY').read_text().strip()}); "
        "run the script and commit, or install that grpcio-tools version"
    )


def fields(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_field_numbers_are_containerds():
    s = {"snapshotter": 1, "key": 2}
    assert fields(pb.PrepareSnapshotRequest) == {**s, "parent": 3, "labels": 4}
    assert fields(pb.ViewSnapshotRequest) == {**s, "parent": 3, "labels": 4}
    assert fields(pb.MountsRequest) == s
    assert fields(pb.RemoveSnapshotRequest) == s
    assert fields(pb.StatSnapshotRequest) == s
    assert fields(pb.UsageRequest) == s
    assert fields(pb.CommitSnapshotRequest) == {
        "snapshotter": 1,
        "name": 2,
        "key": 3,
        "labels": 4,
        "parent": 5,
    }
    assert fields(pb.Info) == {
        "name": 1,
        "parent": 2,
        "kind": 3,
        "created_at": 4,
        "updated_at": 5,
        "labels": 6,
    }
    assert fields(pb.UpdateSnapshotRequest) == {"snapshotter": 1, "info": 2, "update_mask": 3}
    assert fields(pb.ListSnapshotsRequest) == {"snapshotter": 1, "filters": 2}
    assert fields(pb.ListSnapshotsResponse) == {"info": 1}
    assert fields(pb.UsageResponse) == {"size": 1, "inodes": 2}
    assert fields(pb.CleanupRequest) == {"snapshotter": 1}
    for resp in (pb.PrepareSnapshotResponse, pb.ViewSnapshotResponse, pb.MountsResponse):
        assert fields(resp) == {"mounts": 1}
    assert fields(pb.StatSnapshotResponse) == fields(pb.UpdateSnapshotResponse) == {"info": 1}
    assert fields(mount_pb2.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    assert {v.name: v.number for v in pb.Kind.DESCRIPTOR.values} == {
        "UNKNOWN": 0,
        "VIEW": 1,
        "ACTIVE": 2,
        "COMMITTED": 3,
    }


def test_names_are_containerds():
    assert pb.DESCRIPTOR.package == "containerd.services.snapshots.v1"
    assert mount_pb2.DESCRIPTOR.package == "containerd.types"
    service = pb.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    methods = {m.name: (m.input_type.name, m.output_type.full_name) for m in service.methods}
    assert methods == {
        "Prepare": ("PrepareSnapshotRequest", pb.PrepareSnapshotResponse.DESCRIPTOR.full_name),
        "View": ("ViewSnapshotRequest", pb.ViewSnapshotResponse.DESCRIPTOR.full_name),
        "Mounts": ("MountsRequest", pb.MountsResponse.DESCRIPTOR.full_name),
        "Commit": ("CommitSnapshotRequest", "google.protobuf.Empty"),
        "Remove": ("RemoveSnapshotRequest", "google.protobuf.Empty"),
        "Stat": ("StatSnapshotRequest", pb.StatSnapshotResponse.DESCRIPTOR.full_name),
        "Update": ("UpdateSnapshotRequest", pb.UpdateSnapshotResponse.DESCRIPTOR.full_name),
        "List": ("ListSnapshotsRequest", pb.ListSnapshotsResponse.DESCRIPTOR.full_name),
        "Usage": ("UsageRequest", pb.UsageResponse.DESCRIPTOR.full_name),
        "Cleanup": ("CleanupRequest", "google.protobuf.Empty"),
    }
    assert service.methods_by_name["List"].server_streaming
    assert (
        fields(pb.Info)["kind"] == 3
        and pb.Info.DESCRIPTOR.fields_by_name["created_at"].message_type.full_name
        == "google.protobuf.Timestamp"
    )
    mask = pb.UpdateSnapshotRequest.DESCRIPTOR.fields_by_name["update_mask"]
    assert mask.message_type.full_name == "google.protobuf.FieldMask"


def test_status_service_names_are_stable():
    """``stargz status`` of one version talks to the daemon of another: the service and
    method names and the field numbers it relies on never change."""
    from stargz.service.proto.stargz.v1 import status_pb2 as st

    assert st.DESCRIPTOR.package == "stargz.v1"
    service = st.DESCRIPTOR.services_by_name["Status"]
    assert service.full_name == "stargz.v1.Status"
    assert {m.name: m.output_type.name for m in service.methods} == {"Get": "GetStatusResponse"}
    assert fields(st.GetStatusResponse) == {"daemon": 1, "layers": 2, "refused": 3}
    assert fields(st.LayerStatus)["digest"] == 1 and fields(st.LayerStatus)["ref"] == 2
    assert fields(st.RefusedLayer)["reason"] == 5


def test_pull_service_names_are_stable():
    """``stargz rpull`` of one version asks the daemon of another to pull: the service,
    its server-streaming method and the field numbers of the request and events never
    change."""
    from stargz.service.proto.stargz.v1 import pull_pb2 as p

    service = p.DESCRIPTOR.services_by_name["Pull"]
    assert service.full_name == "stargz.v1.Pull"
    (method,) = service.methods
    assert method.name == "Pull" and method.server_streaming and not method.client_streaming
    assert method.input_type.full_name == "stargz.v1.PullRequest"
    assert method.output_type.full_name == "stargz.v1.PullEvent"
    assert fields(p.PullRequest) == {
        "ref": 1, "containerd_address": 2, "namespace": 3, "snapshotter": 4, "plain_http": 5,
        "username": 6, "password": 7, "platform": 8,
    }  # fmt: skip
    assert fields(p.PullEvent) == {"resolved": 1, "manifest": 2, "layer": 3, "done": 4}
    assert fields(p.ImageResolved) == {"ref": 1, "digest": 2, "media_type": 3}
    assert fields(p.ManifestChosen) == {"digest": 1, "layers": 2}
    assert fields(p.LayerDone) == {"index": 1, "digest": 2, "how": 3, "fetched": 4, "chain_id": 5}
    assert fields(p.PullDone) == {"name": 1, "chain_id": 2, "seconds": 3}


def test_cri_subset_is_the_kubelets_wire_format():
    """The CRI subset encodes as kubelet and containerd do: package ``runtime.v1``, the
    ImageService methods the keychain proxies, and the field numbers of upstream
    ``api.proto`` for what the daemon reads (the image, the credentials, the image list)."""
    from stargz.service.proto.k8s.cri.runtime.v1 import api_pb2 as cri

    assert cri.DESCRIPTOR.package == "runtime.v1"
    images = cri.DESCRIPTOR.services_by_name["ImageService"]
    assert images.full_name == "runtime.v1.ImageService"
    assert {m.name for m in images.methods} == {
        "ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo",
    }  # fmt: skip
    assert fields(cri.ImageSpec) == {
        "image": 1, "annotations": 2, "user_specified_image": 18, "runtime_handler": 19,
        "image_ref": 20,
    }  # fmt: skip
    assert fields(cri.AuthConfig) == {
        "username": 1, "password": 2, "auth": 3, "server_address": 4, "identity_token": 5,
        "registry_token": 6,
    }  # fmt: skip
    assert fields(cri.PullImageRequest) == {"image": 1, "auth": 2, "sandbox_config": 3}
    assert fields(cri.PullImageResponse)["image_ref"] == 1
    assert fields(cri.RemoveImageRequest) == {"image": 1}
    assert fields(cri.Image)["repo_tags"] == 2 and fields(cri.Image)["repo_digests"] == 3
    assert fields(cri.ListImagesResponse) == {"images": 1}
    runtime = cri.DESCRIPTOR.services_by_name["RuntimeService"]
    assert {"RunPodSandbox", "CreateContainer", "StartContainer"} <= {
        m.name for m in runtime.methods
    }
    assert fields(cri.NamespaceOption)["network"] == 1
    assert cri.NamespaceMode.Value("NODE") == 2


def test_client_api_numbers_are_containerds():
    """The services ``stargz rpull`` calls (containerd v1.6 ``api/services/{content,
    images,leases,diff}/v1`` and ``api/types/descriptor.proto``): names and numbers."""
    from stargz.service.proto.containerd.services.content.v1 import content_pb2 as c
    from stargz.service.proto.containerd.services.diff.v1 import diff_pb2 as d
    from stargz.service.proto.containerd.services.images.v1 import images_pb2 as i
    from stargz.service.proto.containerd.services.leases.v1 import leases_pb2 as le
    from stargz.service.proto.containerd.types import descriptor_pb2

    desc = descriptor_pb2.Descriptor
    assert desc.DESCRIPTOR.full_name == "containerd.types.Descriptor"
    assert fields(desc) == {"media_type": 1, "digest": 2, "size": 3, "annotations": 5}

    assert c.DESCRIPTOR.package == "containerd.services.content.v1"
    assert fields(c.Info) == {
        "digest": 1,
        "size": 2,
        "created_at": 3,
        "updated_at": 4,
        "labels": 5,
    }
    assert fields(c.InfoRequest) == {"digest": 1}
    assert fields(c.UpdateRequest) == {"info": 1, "update_mask": 2}
    assert fields(c.WriteContentRequest) == {
        "action": 1,
        "ref": 2,
        "total": 3,
        "expected": 4,
        "offset": 5,
        "data": 6,
        "labels": 7,
    }
    assert fields(c.WriteContentResponse) == {
        "action": 1,
        "started_at": 2,
        "updated_at": 3,
        "offset": 4,
        "total": 5,
        "digest": 6,
    }
    assert {v.name: v.number for v in c.WriteAction.DESCRIPTOR.values} == {
        "STAT": 0,
        "WRITE": 1,
        "COMMIT": 2,
    }
    assert fields(c.Status) == {
        "started_at": 1,
        "updated_at": 2,
        "ref": 3,
        "offset": 4,
        "total": 5,
        "expected": 6,
    }
    assert fields(c.ReadContentRequest) == {"digest": 1, "offset": 2, "size": 3}
    content = c.DESCRIPTOR.services_by_name["Content"]
    assert [m.name for m in content.methods] == [
        "Info",
        "Update",
        "List",
        "Delete",
        "Read",
        "Status",
        "ListStatuses",
        "Write",
        "Abort",
    ]
    write = content.methods_by_name["Write"]
    assert write.client_streaming and write.server_streaming

    assert i.DESCRIPTOR.package == "containerd.services.images.v1"
    assert fields(i.Image) == {
        "name": 1,
        "labels": 2,
        "target": 3,
        "created_at": 7,
        "updated_at": 8,
    }
    assert fields(i.CreateImageRequest) == {"image": 1}
    assert fields(i.UpdateImageRequest) == {"image": 1, "update_mask": 2}
    assert fields(i.DeleteImageRequest) == {"name": 1, "sync": 2}
    images = i.DESCRIPTOR.services_by_name["Images"]
    assert [m.name for m in images.methods] == ["Get", "List", "Create", "Update", "Delete"]

    assert le.DESCRIPTOR.package == "containerd.services.leases.v1"
    assert fields(le.Lease) == {"id": 1, "created_at": 2, "labels": 3}
    assert fields(le.CreateRequest) == {"id": 1, "labels": 3}
    assert fields(le.DeleteRequest) == {"id": 1, "sync": 2}
    assert fields(le.Resource) == {"id": 1, "type": 2}
    assert fields(le.AddResourceRequest) == {"id": 1, "resource": 2}

    assert d.DESCRIPTOR.package == "containerd.services.diff.v1"
    assert fields(d.ApplyRequest) == {"diff": 1, "mounts": 2, "payloads": 3}
    assert fields(d.ApplyResponse) == {"applied": 1}
    assert fields(d.DiffRequest) == {
        "left": 1,
        "right": 2,
        "media_type": 3,
        "ref": 4,
        "labels": 5,
    }
    assert fields(d.DiffResponse) == {"diff": 3}
    assert d.DESCRIPTOR.services_by_name["Diff"].full_name == "containerd.services.diff.v1.Diff"
