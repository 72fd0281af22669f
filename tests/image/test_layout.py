"""`stargz.image.layout`: OCI layout references, content-addressed blobs, tags."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from stargz.errors import InvalidArgument, NotFound
from stargz.image.layout import REF_NAME, Layout, check_digest, parse_ref


@pytest.mark.parametrize(
    "ref, path, tag",
    [("oci:/x/y:1", "/x/y", "1"), ("oci:rel:esgz", "rel", "esgz"), ("oci:/a:b:c", "/a:b", "c")],
)
def test_parse_ref(ref, path, tag):
    r = parse_ref(ref)
    assert (r.path, r.tag) == (path, tag)


@pytest.mark.parametrize("ref", ["docker://x:1", "oci:", "oci:dir", "oci::tag", "oci:dir:a/b"])
def test_parse_ref_refuses(ref):
    with pytest.raises(InvalidArgument, match="oci:DIR:TAG"):
        parse_ref(ref)


@pytest.mark.parametrize("digest", ["sha256:" + "0" * 63, "sha512:" + "0" * 64, "../" * 3, 7])
def test_check_digest_refuses(digest):
    with pytest.raises(InvalidArgument, match="not a sha256 digest"):
        check_digest(digest)


def test_a_path_is_not_a_layout_unless_created(tmp_path):
    with pytest.raises(NotFound, match="not an OCI image layout"):
        Layout(str(tmp_path / "nothing"))
    lay = Layout(str(tmp_path / "new"), create=True)
    assert json.loads((tmp_path / "new" / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
    assert lay.index() == {"schemaVersion": 2, "manifests": []}


def test_blobs_are_content_addressed_and_checked(tmp_path):
    lay = Layout(str(tmp_path), create=True)
    digest, size = lay.put_json({"b": 1, "a": [2]})
    with open(lay.blob_path(digest), "rb") as f:
        data = f.read()
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest() and size == len(data)
    assert lay.read_json(digest) == {"b": 1, "a": [2]}
    # no temporary file is left behind
    assert [n for n in os.listdir(tmp_path / "blobs" / "sha256") if n.startswith(".tmp")] == []
    # a blob whose bytes changed is refused, never parsed
    with open(lay.blob_path(digest), "ab") as f:
        f.write(b" ")
    with pytest.raises(InvalidArgument, match="does not match its digest"):
        lay.read_json(digest)
    with pytest.raises(NotFound, match="missing"):
        lay.open_blob("sha256:" + "1" * 64)


def test_json_that_is_not_an_object_is_refused(tmp_path):
    lay = Layout(str(tmp_path), create=True)
    tmp = lay.new_blob()
    tmp.write(b"[1, 2]")
    digest = "sha256:" + hashlib.sha256(b"[1, 2]").hexdigest()
    lay.commit_blob(tmp, digest)
    with pytest.raises(InvalidArgument, match="not a JSON object"):
        lay.read_json(digest)


def test_tags_point_at_one_descriptor_each(tmp_path):
    lay = Layout(str(tmp_path), create=True)
    a = {"mediaType": "m", "digest": "sha256:" + "a" * 64, "size": 1}
    b = {"mediaType": "m", "digest": "sha256:" + "b" * 64, "size": 2}
    lay.tag(a, "t1")
    lay.tag(b, "t2")
    lay.tag(b, "t1")  # moves t1
    assert lay.resolve("t1")["digest"] == b["digest"]
    assert lay.resolve("t2")["digest"] == b["digest"]
    assert [d["annotations"][REF_NAME] for d in lay.index()["manifests"]] == ["t2", "t1"]
    with pytest.raises(NotFound, match="tag 'nope'"):
        lay.resolve("nope")


def test_a_broken_index_is_a_clear_error(tmp_path):
    lay = Layout(str(tmp_path), create=True)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(InvalidArgument, match="index.json is not valid JSON"):
        lay.index()
    (tmp_path / "index.json").write_text('{"manifests": 3}')
    with pytest.raises(InvalidArgument, match="not an OCI index"):
        lay.index()
