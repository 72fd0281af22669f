"""``stargz optimize --from-trace``: re-order an image from what the daemon recorded in
production (`stargz.fs.trace.ImageTracer`), without running anything.

A trace names layers by digest (the eStargz blobs the daemon mounted). When the source
image is that image, each traced file goes to its layer; a trace of other layers (e.g.
taken on the converted image while the source is the original) still applies its paths,
to every layer that has them, when it is the one trace file given.
"""

from __future__ import annotations

import os

from stargz.errors import NotFound
from stargz.fs.trace import TRACE_DIR, TRACE_SUFFIX, read_trace
from stargz.image.source import SourceImage
from stargz.optimize import record


def trace_files(path: str) -> list[str]:
    """``path`` itself, or the trace files of a trace dir (or of a daemon root)."""
    if os.path.isdir(os.path.join(path, TRACE_DIR)):
        path = os.path.join(path, TRACE_DIR)
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise NotFound(f"no trace at {path!r}")
        return [path]
    return sorted(
        (os.path.join(path, n) for n in os.listdir(path) if n.endswith(TRACE_SUFFIX)),
        key=lambda p: os.stat(p).st_mtime,
        reverse=True,
    )


def entries_for(image: SourceImage, path: str) -> list[record.Entry]:
    """The record entries of the trace at ``path`` (file or dir) for ``image``: the most
    recent trace whose layers are the image's; else, for a single file, its paths."""
    files = trace_files(path)
    index = {d.get("digest"): i for i, d in enumerate(image.layers)}  # repeated: the top one
    for f in files:
        traced = read_trace(f)
        hits = [e for e in traced if e["layerDigest"] in index]
        if hits:
            return [record.Entry(e["path"], image.digest, index[e["layerDigest"]]) for e in hits]
    if len(files) == 1:
        return [record.Entry(e["path"], image.digest) for e in read_trace(files[0])]
    raise NotFound(f"no trace under {path!r} is of a layer of {image.ref}")
