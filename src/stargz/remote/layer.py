"""Open an eStargz layer straight from the registry.

The eStargz :class:`~stargz.estargz.Reader` is synchronous and sees the blob through a
``read_at`` callable; here it runs in a worker thread and reads through
:meth:`BlobReader.sync_read_at`, so the event loop keeps serving while the footer and
TOC arrive.
"""

from __future__ import annotations

import asyncio
from typing import Any

from stargz.estargz import Reader
from stargz.remote.blob import BlobReader


async def open_reader(blob: BlobReader, *, toc_digest: str | None, **kwargs: Any) -> Reader:
    """An eStargz Reader over ``blob``, its TOC checked against ``toc_digest``.

    Opening fetches the blob's tail (footer and usually the whole TOC) and maybe the rest
    of the TOC. The Reader's own later reads (``Reader.read``) block: call them from a
    worker thread too. ``kwargs`` go to :class:`~stargz.estargz.Reader`.
    """
    loop = asyncio.get_running_loop()
    read_at = blob.sync_read_at(loop)
    return await asyncio.to_thread(Reader, read_at, blob.size, toc_digest=toc_digest, **kwargs)
