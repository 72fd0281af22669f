"""Demo of the foundation: convert fixture images, verify with our reader and Go's."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from stargz.estargz import open_file
from stargz.estargz.extract import extract
from stargz.image.convert import ConvertOptions, convert
from stargz.image.layout import Layout


def main(shared: str, go_verify: str) -> int:
    work = tempfile.mkdtemp(prefix="stargz-demo-")
    try:
        for image, tag in (("oci-busybox", "1"), ("oci-corners", "orig")):
            src = os.path.join(work, image)
            shutil.copytree(os.path.join(shared, "fixtures", image), src)
            for mode, opts in (
                ("estargz", ConvertOptions()),
                ("zstdchunked", ConvertOptions(compression="zstd")),
            ):
                t0 = time.perf_counter()
                desc, stats = convert(f"oci:{src}:{tag}", f"oci:{src}:{mode}", opts)
                secs = time.perf_counter() - t0
                raw = sum(s.uncompressed_size for s in stats)
                out = sum(s.dst_size for s in stats)
                print(
                    f"{image}:{tag} -> {mode}: {len(stats)} layers, {raw / 1e6:.1f} MB "
                    f"-> {out / 1e6:.1f} MB in {secs:.2f}s ({raw / 1e6 / secs:.0f} MB/s)"
                )
                layout = Layout(src)
                manifest = layout.read_json(desc["digest"])
                for i, layer in enumerate(manifest["layers"]):
                    blob = layout.blob_path(layer["digest"])
                    toc = layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
                    dest = os.path.join(work, f"x-{image}-{mode}-{i}")
                    with open_file(blob, toc_digest=toc) as r:
                        n = extract(r, dest, warn=lambda m: None)
                    go = subprocess.run([go_verify, blob, toc], capture_output=True, text=True)
                    if go.returncode != 0:
                        print(f"  layer {i}: Go reference reader FAILED: {go.stderr.strip()}")
                        return 1
                    listed = sum(1 for line in go.stdout.splitlines() if json.loads(line))
                    print(
                        f"  layer {i}: {n} entries extracted and verified; "
                        f"Go reader: {listed} entries OK"
                    )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
