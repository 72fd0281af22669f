"""A minimal daemon for the handover tests: one StargzFileSystem in its own process.

It mounts one layer of a local OCI layout at a mount point, keeps the FUSE descriptor
with the keeper `stargz.fuse.handover.choose` picks (a holder process, or systemd's
store when ``$NOTIFY_SOCKET``/``$FDSTORE`` say so), prints ``READY`` and serves until
killed. ``--hang-when FILE``: once FILE exists, every blob read below the TOC waits
forever, after printing ``HANG``: a READ the daemon has taken from /dev/fuse and will
never answer (the fault a ``kill -9`` then turns into a request only FUSE_NOTIFY_RESEND
can recover).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from stargz.fs import FsOptions, LocalLayerSource, StargzFileSystem
from stargz.fuse import handover


class _HangingSource(LocalLayerSource):
    when = ""

    async def resolve(self, ref, digest, labels):
        blob = await super().resolve(ref, digest, labels)
        real = blob.read_ranges

        async def read_ranges(ranges):
            far = all(off + n < blob.size - (256 << 10) for off, n in ranges)
            if far and os.path.exists(self.when):
                print("HANG", flush=True)
                await asyncio.Event().wait()
            return await real(ranges)

        blob.read_ranges = read_ranges
        return blob


async def main(args: argparse.Namespace) -> None:
    source = (_HangingSource if args.hang_when else LocalLayerSource)(layouts=[args.layout])
    source.when = args.hang_when
    opts = FsOptions(no_background_fetch=True, noprefetch=True)
    fs = StargzFileSystem(args.root, source, opts, handover=handover.choose(args.root))
    await fs.start()
    await fs.mount(args.mountpoint, json.loads(args.labels))
    print("READY", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--layout", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--hang-when", default="")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(p.parse_args()))
    sys.exit(0)
