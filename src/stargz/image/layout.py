"""OCI image layouts (``oci:DIR:TAG``): read blobs, write blobs atomically, tag manifests.

A layout is a directory with ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>``.
Tags are the ``org.opencontainers.image.ref.name`` annotation of index.json entries.
Blobs are written to a temporary name inside ``blobs/`` and renamed once complete, so a
crash never leaves a blob whose name does not match its content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from stargz.errors import InvalidArgument, NotFound

REF_NAME = "org.opencontainers.image.ref.name"
OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = {MT_OCI_MANIFEST, MT_DOCKER_MANIFEST}
INDEX_TYPES = {MT_OCI_INDEX, MT_DOCKER_LIST}


@dataclass(frozen=True)
class LayoutRef:
    path: str
    tag: str


def parse_ref(ref: str) -> LayoutRef:
    """Parse ``oci:DIR:TAG`` (the tag is what follows the last colon)."""
    if not ref.startswith("oci:"):
        raise InvalidArgument(f"image reference {ref!r} must look like oci:DIR:TAG")
    rest = ref[4:]
    path, sep, tag = rest.rpartition(":")
    if not sep or not path or not tag or "/" in tag:
        raise InvalidArgument(f"image reference {ref!r} must look like oci:DIR:TAG")
    return LayoutRef(path, tag)


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InvalidArgument(f"{digest!r} is not a sha256 digest")
    return digest


class Layout:
    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = path
        index = os.path.join(path, "index.json")
        if not os.path.exists(index):
            if not create:
                raise NotFound(f"{path!r} is not an OCI image layout (no index.json)")
            os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
            with open(os.path.join(path, "oci-layout"), "w") as f:
                json.dump(OCI_LAYOUT, f)
            self._write_index({"schemaVersion": 2, "manifests": []})

    def blob_path(self, digest: str) -> str:
        alg, _, hexd = check_digest(digest).partition(":")
        return os.path.join(self.path, "blobs", alg, hexd)

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is missing from {self.path!r}") from None

    def read_json(self, digest: str) -> dict[str, Any]:
        with self.open_blob(digest) as f:
            data = f.read()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise InvalidArgument(f"blob {digest} in {self.path!r} does not match its digest")
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise InvalidArgument(f"blob {digest} is not valid JSON: {e}") from e
        if not isinstance(doc, dict):
            raise InvalidArgument(f"blob {digest} is not a JSON object")
        return doc

    def new_blob(self) -> tempfile._TemporaryFileWrapper:
        """A temp file in the blob dir; pass it to `commit_blob` when written."""
        d = os.path.join(self.path, "blobs", "sha256")
        os.makedirs(d, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=d, prefix=".tmp-", delete=False)

    def commit_blob(self, tmp: tempfile._TemporaryFileWrapper, digest: str) -> None:
        tmp.flush()
        os.fsync(tmp.fileno())
        tmp.close()
        os.replace(tmp.name, self.blob_path(digest))

    def put_json(self, doc: dict[str, Any]) -> tuple[str, int]:
        data = json.dumps(doc, separators=(",", ":")).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        tmp = self.new_blob()
        tmp.write(data)
        self.commit_blob(tmp, digest)
        return digest, len(data)

    def index(self) -> dict[str, Any]:
        with open(os.path.join(self.path, "index.json"), "rb") as f:
            try:
                doc = json.load(f)
            except ValueError as e:
                raise InvalidArgument(f"{self.path}/index.json is not valid JSON: {e}") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
            raise InvalidArgument(f"{self.path}/index.json is not an OCI index")
        return doc

    def resolve(self, tag: str) -> dict[str, Any]:
        """The index.json descriptor tagged ``tag``."""
        for desc in self.index().get("manifests") or []:
            if (desc.get("annotations") or {}).get(REF_NAME) == tag:
                return desc
        raise NotFound(f"tag {tag!r} not found in {self.path!r}")

    def tag(self, desc: dict[str, Any], tag: str) -> None:
        """Point ``tag`` at ``desc`` (replacing what it pointed at)."""
        index = self.index()
        manifests = [
            d
            for d in index.get("manifests") or []
            if (d.get("annotations") or {}).get(REF_NAME) != tag
        ]
        desc = dict(desc)
        desc["annotations"] = {**(desc.get("annotations") or {}), REF_NAME: tag}
        manifests.append(desc)
        index["manifests"] = manifests
        self._write_index(index)

    def _write_index(self, index: dict[str, Any]) -> None:
        tmp = os.path.join(self.path, ".index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2)
        os.replace(tmp, os.path.join(self.path, "index.json"))
