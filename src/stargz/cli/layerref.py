"""The layer ``get-toc-digest``, ``inspect`` and ``extract`` read: a blob file, or a
layer of an image in an OCI layout or a registry (``--layer N`` or ``--layer DIGEST``).

A registry layer is read in place with range requests (footer and TOC only, as the daemon
does), and verified against its TOC digest annotation unless ``--toc-digest`` says
otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from stargz.errors import InvalidArgument, NotFound
from stargz.estargz import reader as esgz_reader
from stargz.estargz.writer import TOC_DIGEST_ANNOTATION


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layer",
        metavar="N|DIGEST",
        help="with an image: which layer (0 is the bottom one; needed when it has several)",
    )
    p.add_argument(
        "--platform", metavar="OS/ARCH", help="with an image index: which platform (default: host)"
    )
    p.add_argument(
        "--plain-http", action="store_true", help="http to the registry (automatic for localhost)"
    )


def open_layer(args: argparse.Namespace) -> esgz_reader.Reader:
    """Open ``args.blob``: a file as it is, else an image's layer."""
    toc = getattr(args, "toc_digest", None)
    verify = not args.no_verify
    if os.path.isfile(args.blob):
        if args.layer is not None:
            raise InvalidArgument(f"{args.blob!r} is a blob file: --layer is for images")
        return esgz_reader.open_file(args.blob, toc_digest=toc, verify=verify)
    from stargz.image.refs import LayoutLocation, parse_location

    loc = parse_location(args.blob)
    if isinstance(loc, LayoutLocation):
        return _from_layout(loc, args, toc, verify)
    return asyncio.run(_from_registry(loc.ref, args, toc, verify))


def _pick(layers: list[Any], sel: str | None, what: str) -> Any:
    """The chosen layer descriptor (dicts or remote Descriptors)."""

    def digest(d: Any) -> str:
        return d["digest"] if isinstance(d, dict) else d.digest

    if sel is None:
        if len(layers) != 1:
            raise InvalidArgument(
                f"{what} has {len(layers)} layers: pick one with --layer N (0 to "
                f"{len(layers) - 1}) or --layer DIGEST"
            )
        return layers[0]
    if sel.isdigit():
        i = int(sel)
        if i >= len(layers):
            raise InvalidArgument(f"{what} has {len(layers)} layers: no layer {i}")
        return layers[i]
    for d in layers:
        if digest(d) == sel or digest(d).removeprefix("sha256:").startswith(sel):
            return d
    raise NotFound(f"{what} has no layer {sel}")


def _from_layout(
    loc: Any, args: argparse.Namespace, toc: str | None, verify: bool
) -> esgz_reader.Reader:
    from stargz.image.endpoints import LayoutSource, load_object
    from stargz.image.layout import INDEX_TYPES
    from stargz.remote.manifest import Platform, host_platform, select_platform

    src = LayoutSource(loc.path, loc.tag)

    async def manifest() -> dict[str, Any]:
        desc, raw = await src.resolve()
        doc = load_object(raw, src.name)
        if desc.get("mediaType") in INDEX_TYPES or "manifests" in doc:
            want = Platform.parse(args.platform) if args.platform else host_platform()
            entry = select_platform(doc, want, src.name)
            doc = load_object(await src.fetch(entry.digest), src.name)
        return doc

    man = asyncio.run(manifest())
    layer = _pick(list(man.get("layers") or []), args.layer, src.name)
    toc = toc or (layer.get("annotations") or {}).get(TOC_DIGEST_ANNOTATION)
    path = src.local_path(layer["digest"])
    assert path is not None
    return esgz_reader.open_file(path, toc_digest=toc, verify=verify)


async def _from_registry(
    ref: Any, args: argparse.Namespace, toc: str | None, verify: bool
) -> esgz_reader.Reader:
    from stargz.image.registry import make_client
    from stargz.remote.layer import open_reader
    from stargz.remote.manifest import Platform

    platform = Platform.parse(args.platform) if args.platform else None
    async with make_client([ref], plain_http=args.plain_http) as client:
        man = await client.get_manifest(ref, platform=platform)
        layer = _pick(list(man.layers), args.layer, str(ref))
        blob = await client.open_layer(ref, layer)
        # the Reader is used after the client is closed: it must need no more reads
        return await open_reader(blob, toc_digest=toc or layer.toc_digest, verify=verify)
