"""`stargz.image.source`: the one image ``stargz optimize`` runs, from any form of
reference `stargz convert` takes (the layout forms here; registries in
``tests/e2e/test_optimize_registry.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.oci import find_manifest, two_platform_layout

from stargz.errors import FailedPrecondition, InvalidArgument, ManifestNotFound
from stargz.image.source import source_image


@pytest.fixture
def multi(shared_dir: Path, tmp_path: Path) -> Path:
    return two_platform_layout(shared_dir / "fixtures" / "oci-busybox", "1", tmp_path / "multi")


def test_every_layout_form_names_the_same_image(multi: Path):
    want = find_manifest(multi, "1")
    for ref in (f"oci:{multi}:1", f"{multi}:1"):
        img = source_image(ref)
        assert img.manifest == want
        assert img.convert_ref == ref and img.tag == "1"
        (layer,) = img.layers
        assert Path(img.blob_path(layer["digest"])).stat().st_size == layer["size"]


def test_an_index_gives_the_hosts_platform_or_the_one_asked_for(multi: Path):
    index = json.loads((multi / "index.json").read_text())
    entry = next(
        m
        for m in index["manifests"]
        if m["annotations"].get("org.opencontainers.image.ref.name") == "multi"
    )
    idx = json.loads((multi / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
    by_arch = {m["platform"]["architecture"]: m["digest"] for m in idx["manifests"]}
    default = source_image(f"oci:{multi}:multi")
    assert default.config["architecture"] == "amd64" and default.digest == by_arch["amd64"]
    arm = source_image(f"oci:{multi}:multi", "linux/arm64")
    assert arm.config["architecture"] == "arm64" and arm.digest == by_arch["arm64"]
    with pytest.raises(ManifestNotFound, match=r"no manifest for platform linux/s390x .*amd64"):
        source_image(f"oci:{multi}:multi", "linux/s390x")
    with pytest.raises(InvalidArgument, match="want os/arch"):
        source_image(f"oci:{multi}:multi", "linux")


def test_a_layout_of_several_images_needs_a_tag(multi: Path):
    with pytest.raises(InvalidArgument, match="name one as oci:DIR:TAG"):
        source_image(f"oci:{multi}")


def test_blob_path_without_local_blobs_is_a_clear_error(multi: Path):
    img = source_image(f"oci:{multi}:1")
    img.layout = None
    with pytest.raises(FailedPrecondition, match="not on this machine"):
        img.blob_path(img.layers[0]["digest"])
