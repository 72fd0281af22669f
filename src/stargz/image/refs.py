"""Where an image is: an OCI layout directory or a registry reference.

The forms ``stargz convert``, ``get-toc-digest`` and ``inspect`` take:

- ``oci:DIR:TAG`` / ``oci:DIR`` -- an OCI image layout (the tag is what follows the last
  colon; without one, the layout's only image, or for a destination the source's tag);
- ``docker://REF`` -- a registry reference, whatever it looks like;
- ``REGISTRY/REPO:TAG``, ``REGISTRY/REPO@sha256:...`` -- a registry reference when the
  first component names a registry host (has a ``.`` or a ``:``, or is ``localhost``);
- anything else is a directory path, ``DIR:TAG`` or ``DIR`` (as ``oci:``). An existing
  directory always wins, so ``oci:`` is only needed for a new directory whose name looks
  like a registry host.

A bare ``ubuntu:22.04`` is therefore a directory, never Docker Hub: write
``docker://ubuntu:22.04`` (or ``docker.io/library/ubuntu:22.04``) for that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from stargz.errors import InvalidArgument
from stargz.remote.reference import Reference, parse_reference


@dataclass(frozen=True)
class LayoutLocation:
    path: str
    tag: str | None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class RegistryLocation:
    ref: Reference

    def __str__(self) -> str:
        return str(self.ref)


ImageLocation = LayoutLocation | RegistryLocation


def _layout(text: str) -> LayoutLocation:
    path, sep, tag = text.rpartition(":")
    if sep and path and tag and "/" not in tag and not os.path.isdir(text):
        return LayoutLocation(os.path.expanduser(path), tag)
    if not text:
        raise InvalidArgument("empty OCI layout path")
    return LayoutLocation(os.path.expanduser(text), None)


def _looks_like_registry(text: str) -> bool:
    first, sep, _ = text.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def parse_location(text: str) -> ImageLocation:
    """Parse an image argument (see the module docstring)."""
    if text.startswith("oci:"):
        return _layout(text[4:])
    if text.startswith("docker://"):
        return RegistryLocation(parse_reference(text[len("docker://") :]))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise InvalidArgument(f"{text!r}: unknown transport {scheme!r} (oci: or docker://)")
    path, sep, tag = text.rpartition(":")
    if os.path.isdir(text) or (sep and "/" not in tag and os.path.isdir(path)):
        return _layout(text)
    if text.startswith(("/", "./", "../", "~")) or not _looks_like_registry(text):
        return _layout(text)
    return RegistryLocation(parse_reference(text))
