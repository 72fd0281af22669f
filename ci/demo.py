"""The main job: build, optimize, push, lazily pull and run, every step with our tools.

Brings up, on this machine and in temporary directories, a real docker-registry, our
``containerd-stargz-grpc`` daemon and a real containerd 1.6 that uses it as a proxy
snapshotter. Builds an example image (the busybox fixture plus a ~50 MB layer of this
machine's Python standard library) and pushes it to the registry as an ordinary image;
then, registry to registry, ``stargz convert`` makes its eStargz form and ``stargz
optimize`` (the workload run in a sandbox: our FUSE mounts, overlayfs, runc) its
workload-optimized form; every layer of both is checked with the Go reference reader.
Then:

* legacy: ``ctr i pull`` + ``ctr run`` with containerd's overlayfs snapshotter (full pull);
* lazy:   ``stargz rpull`` (our client of containerd's API, no Go tool; the daemon makes the
  pull it asks for) of the optimized image + ``ctr run`` with our snapshotter (nothing
  downloaded up front; the files the workload needs are prefetched, the rest is read
  through FUSE on demand).

Prints the times and the fraction of the image fetched from the registry.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

from benchmarks._images import extend_image
from tests.harness.procs import (
    Containerd,
    Registry,
    StargzDaemon,
    make_tempdir,
    run,
    shared_dir,
)

SCRIPT = "cat /etc/greeting; ls /bin | wc -l; cat /usr/lib/python3.11/json/*.py | wc -c"
WORKLOAD = ["sh", "-c", SCRIPT]
TOC_KEY = "containerd.io/snapshot/stargz/toc.digest"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def timed(fn, *args, **kw) -> float:
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def stargz(*args: str) -> None:
    run([sys.executable, "-m", "stargz.cli.main", *args], timeout=600)


def manifest_of(reg: Registry, ref: str) -> dict:
    """The (single-platform) OCI manifest ``ref`` names in ``reg``."""
    repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
    req = urllib.request.Request(
        f"http://{reg.host}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


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
        for d in ("registry", "stargz", "containerd"):
            (work / d).mkdir()
        with (
            Registry.start(work / "registry") as reg,
            StargzDaemon.start(work / "stargz", config_text="no_background_fetch = true\n") as sd,
            Containerd.start(sd.address, work / "containerd") as cd,
        ):
            orig = reg.push_oci(layout, "orig", "demo:orig")
            esgz, opt = reg.ref("demo:esgz"), reg.ref("demo:opt")
            t = timed(stargz, "convert", "-q", orig, esgz)
            print(f"stargz convert  {orig} -> {esgz}: {t:.2f}s")
            t = timed(
                stargz,
                *["optimize", "-q", "--period", "20", "--entrypoint", '["/bin/sh", "-c"]'],
                *["--args", json.dumps([SCRIPT]), orig, opt],
            )
            print(f"stargz optimize {orig} -> {opt}: {t:.2f}s (the workload ran under runc)")
            for ref in (esgz, opt):
                layers = manifest_of(reg, ref)["layers"]
                for layer in layers:
                    blob = str(reg.blob_file(layer["digest"]))
                    run([go_verify, blob, layer["annotations"][TOC_KEY]])
                total = sum(x["size"] for x in layers)
                print(
                    f"  {ref}: {len(layers)} layers, {total / 1e6:.1f} MB, "
                    "each verified by the Go reference reader (esgz-verify)"
                )

            pull = timed(cd.ctr, "images", "pull", "--plain-http", orig, ns="legacy")
            runs = timed(cd.ctr, "run", "--rm", orig, "demo", *WORKLOAD, ns="legacy")
            print(f"legacy (overlayfs, full pull): pull {pull:.2f}s  run {runs:.2f}s")

            lazy_pull = timed(
                stargz, "rpull", "-q", "--daemon-address", sd.address, "-a", cd.address,
                "-n", "lazy", opt,
            )  # fmt: skip
            t0 = time.perf_counter()
            out = cd.ctr(
                "run", "--rm", "--snapshotter", "stargz", opt, "demo", *WORKLOAD, ns="lazy"
            )
            lazy_run = time.perf_counter() - t0
            print(f"lazy (stargz, optimized):      pull {lazy_pull:.2f}s  run {lazy_run:.2f}s")
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
