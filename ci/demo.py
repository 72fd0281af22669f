"""The main job: lazily pull and run an image converted by our own converter.

Brings up, on this machine and in temporary directories, a real docker-registry, our
``containerd-stargz-grpc`` daemon and a real containerd 1.6 that uses it as a proxy
snapshotter. Builds an example image (the busybox fixture plus a ~50 MB layer of this
machine's Python standard library), converts it with ``stargz convert``, checks every
converted layer with the Go reference reader, pushes both forms to the registry, then:

* legacy: ``ctr i pull`` + ``ctr run`` with containerd's overlayfs snapshotter (full pull);
* lazy:   ``stargz rpull`` (our client of containerd's API, no Go tool) + ``ctr run``
  with our snapshotter (nothing downloaded up front; the run reads a few files through
  FUSE).

Prints pull and run times and the fraction of the image fetched from the registry.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

from benchmarks._images import extend_image
from stargz.image.convert import ConvertOptions, convert
from stargz.image.layout import Layout
from tests.harness.procs import (
    Containerd,
    Registry,
    StargzDaemon,
    make_tempdir,
    run,
    shared_dir,
)

WORKLOAD = ["sh", "-c", "cat /etc/greeting; ls /bin | wc -l"]
TOC_KEY = "containerd.io/snapshot/stargz/toc.digest"


def timed(fn, *args, **kw) -> float:
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def main(go_verify: str) -> int:
    work = make_tempdir("sgz-demo-")
    layout = work / "image"
    try:
        shutil.copytree(shared_dir() / "fixtures" / "oci-busybox", layout)
        os.chmod(layout, 0o755)
        for p in layout.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        extra = extend_image(str(layout), "1", "orig", ["/usr/lib/python3.11"])
        print(
            f"example image: busybox + python stdlib layer ({extra['uncompressed'] / 1e6:.0f} MB)"
        )

        t = timed(convert, f"oci:{layout}:orig", f"oci:{layout}:esgz", ConvertOptions())
        lay = Layout(str(layout))
        manifest = lay.read_json(lay.resolve("esgz")["digest"])
        total = sum(x["size"] for x in manifest["layers"])
        print(
            f"converted with our converter in {t:.2f}s: "
            f"{len(manifest['layers'])} layers, {total / 1e6:.1f} MB"
        )
        for layer in manifest["layers"]:
            run([go_verify, lay.blob_path(layer["digest"]), layer["annotations"][TOC_KEY]])
        print("  every layer verified by the Go reference reader (esgz-verify)")

        for d in ("registry", "stargz", "containerd"):
            (work / d).mkdir()
        with (
            Registry.start(work / "registry") as reg,
            StargzDaemon.start(work / "stargz", config_text="no_background_fetch = true\n") as sd,
            Containerd.start(sd.address, work / "containerd") as cd,
        ):
            orig = reg.push_oci(layout, "orig", "demo:orig")
            esgz = reg.push_oci(layout, "esgz", "demo:esgz")

            pull = timed(cd.ctr, "images", "pull", "--plain-http", orig, ns="legacy")
            runs = timed(cd.ctr, "run", "--rm", orig, "demo", *WORKLOAD, ns="legacy")
            print(f"legacy (overlayfs, full pull): pull {pull:.2f}s  run {runs:.2f}s")

            lazy_pull = timed(
                run,
                [sys.executable, "-m", "stargz.cli.main", "rpull", "-q"]
                + ["-a", cd.address, "-n", "lazy", esgz],
            )
            t0 = time.perf_counter()
            out = cd.ctr(
                "run", "--rm", "--snapshotter", "stargz", esgz, "demo", *WORKLOAD, ns="lazy"
            )
            lazy_run = time.perf_counter() - t0
            print(f"lazy (stargz, eStargz):        pull {lazy_pull:.2f}s  run {lazy_run:.2f}s")
            print("container output: " + " | ".join(out.stdout.split("\n")).strip(" |"))

            fetched = size = 0
            for state in glob.glob(
                os.path.join(sd.root, "fuse", "*", ".stargz-snapshotter", "*.json")
            ):
                with open(state) as f:
                    doc = json.load(f)
                fetched += doc["fetchedSize"]
                size += doc["size"]
            remote = [r for r in sd.log_records() if r.get("remote-snapshot-prepared") == "true"]
            pct = 100 * fetched / max(size, 1)
            print(
                f"layers mounted lazily: {len(remote)}; "
                f"fetched {fetched / 1e6:.2f} MB of {size / 1e6:.1f} MB ({pct:.1f}%)"
            )
        return 0
    finally:
        subprocess.run(["umount", "-R", "-l", str(work)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
