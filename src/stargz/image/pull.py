"""A registry image's layers onto this machine, as an OCI layout in a scratch dir.

``stargz optimize`` mounts layers from local files; for a registry source they are
downloaded here first, each streamed into a file and checked against its digest
(`stargz.remote.download`), up to ``jobs`` at once. The manifest and config are stored
byte for byte as the registry served them, so the layout's image has the same digests
and `convert` can read it from there instead of downloading the layers a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os

from stargz.errors import InvalidArgument
from stargz.image.endpoints import sha256_of
from stargz.image.layout import Layout
from stargz.image.progress import NO_EVENTS, Events
from stargz.image.refs import RegistryLocation, parse_location
from stargz.image.source import SourceImage

DEFAULT_JOBS = 3


def pull_layers(
    image: SourceImage,
    path: str,
    *,
    plain_http: bool = False,
    jobs: int = DEFAULT_JOBS,
    events: Events = NO_EVENTS,
) -> SourceImage:
    """``image`` (of a registry) with its manifest, config and layers in a new layout at
    ``path``, tagged ``image.tag``; ``convert_ref`` names that layout."""
    return asyncio.run(
        pull_layers_async(image, path, plain_http=plain_http, jobs=jobs, events=events)
    )


async def pull_layers_async(
    image: SourceImage,
    path: str,
    *,
    plain_http: bool = False,
    jobs: int = DEFAULT_JOBS,
    events: Events = NO_EVENTS,
) -> SourceImage:
    """:func:`pull_layers` on a running event loop."""
    loc = parse_location(image.ref)
    if not isinstance(loc, RegistryLocation):
        raise InvalidArgument(f"{image.ref} is not a registry image")
    if jobs < 1:
        raise InvalidArgument(f"jobs must be at least 1, got {jobs}")
    layout = Layout(path, create=True)
    cdigest = image.manifest["config"]["digest"]
    for raw, digest in ((image.raw_config, cdigest), (image.raw_manifest, image.digest)):
        if sha256_of(raw) != digest:
            raise InvalidArgument(f"{image.ref}: {digest} is not a sha256 digest of its bytes")
        tmp = layout.new_blob()
        tmp.write(raw)
        layout.commit_blob(tmp, digest)

    from stargz.image.registry import RegistrySource, make_client

    async with make_client([loc.ref], plain_http=plain_http) as client:
        source = RegistrySource(client, loc.ref)
        sem = asyncio.Semaphore(jobs)

        async def one(digest: str, size: int | None) -> None:
            async with sem:
                final = layout.blob_path(digest)
                if os.path.exists(final):
                    return
                tmp = layout.new_blob()
                try:
                    events.begin(digest, "download", size)
                    await source.download(
                        digest, size, tmp, lambda n: events.advance(digest, n, size)
                    )
                    await asyncio.to_thread(layout.commit_blob, tmp, digest)
                    events.end(digest, "download")
                except BaseException:
                    tmp.close()
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp.name)
                    raise

        sizes: dict[str, int | None] = {}
        for d in image.layers:
            size = d.get("size")
            sizes[d["digest"]] = size if isinstance(size, int) else None
        tasks = [asyncio.ensure_future(one(d, s)) for d, s in sizes.items()]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    layout.tag(image.descriptor, image.tag)
    return dataclasses.replace(image, layout=layout, convert_ref=f"oci:{path}:{image.tag}")
