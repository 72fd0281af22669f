"""The HelloBench images: python, gcc and nginx in every form the modes pull.

``rootfs.sh`` builds the Debian minbase root filesystems once (debootstrap, under
``$STARGZ_BENCH_CACHE``, default /var/cache/stargz-bench); :func:`prepare_images` packs each
into a one-layer gzip image (tag ``orig``) and converts it with our converter and Go's, all
in the OCI layout ``<cache>/oci/<image>``. Only missing tags are built.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

from benchmarks.common import CACHE, log
from stargz.image.layout import MT_OCI_CONFIG, MT_OCI_MANIFEST, Layout
from tests.harness.procs import Containerd, Registry, make_tempdir, run

ROOTFS_SH = Path(__file__).resolve().parent / "rootfs.sh"

#: The modes bench_hellobench.py runs by default, and the extra ones it runs when named.
MODES = ["legacy", "ours-noopt", "ours-opt", "go-noopt", "go-opt"]
EXTRA_MODES = ["ours-opt9", "ours-on-go-opt", "ours-opt-pt", "ours-opt-nohs"]
TAG_OF = {
    "legacy": "orig",
    "ours-noopt": "ours-noopt",
    "ours-opt": "ours-opt",
    "go-noopt": "go-noopt",
    "go-opt": "go-opt",
    "ours-opt9": "ours-opt9",
    "ours-on-go-opt": "go-opt",
    "ours-opt-pt": "ours-opt",
    "ours-opt-nohs": "ours-opt",
}
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: image -> (command, ready line)
WORKLOADS: dict[str, tuple[list[str], str]] = {
    "python": (["python3", "-c", "print('hello')"], "hello"),
    "gcc": (["sh", "-c", "gcc -o /tmp/hello /hello.c && /tmp/hello"], "hello"),
    # nginx opens its listening sockets before it daemonizes: the parent's exit means ready.
    "nginx": (["sh", "-c", "nginx && echo ready && exec sleep 3600"], "ready"),
}
LANDMARK = ".prefetch.landmark"


def _tar_gz_rootfs(root: Path) -> tuple[bytes, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                tf.add(dirpath, arcname=rel, recursive=False)
            for name in sorted(
                filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            ):
                p = os.path.join(dirpath, name)
                arc = name if rel == "." else os.path.join(rel, name)
                tf.add(p, arcname=arc, recursive=False)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return raw.getvalue(), gzip.compress(raw.getvalue(), 6, mtime=0)


def pack_rootfs(layout_dir: Path, tag: str, root: Path, cmd: list[str]) -> dict:
    """One-layer gzip OCI image of ``root`` (the 'original' form)."""
    layout = Layout(str(layout_dir), create=True)
    raw, blob = _tar_gz_rootfs(root)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    tmp = layout.new_blob()
    tmp.write(blob)
    layout.commit_blob(tmp, digest)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "config": {"Cmd": cmd, "Env": [PATH_ENV], "WorkingDir": "/"},
    }
    cdigest, csize = layout.put_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": len(blob),
            }
        ],
    }
    mdigest, msize = layout.put_json(manifest)
    layout.tag({"mediaType": MT_OCI_MANIFEST, "digest": mdigest, "size": msize}, tag)
    return {"uncompressed": len(raw), "compressed": len(blob)}


def layers_of(layout_dir: Path, tag: str) -> list[dict]:
    lay = Layout(str(layout_dir))
    return lay.read_json(lay.resolve(tag)["digest"])["layers"]


def has_tag(layout_dir: Path, tag: str) -> bool:
    try:
        Layout(str(layout_dir)).resolve(tag)
        return True
    except Exception:
        return False


def prioritized_from_go(layout_dir: Path) -> list[str]:
    """Paths Go's optimizer put before the prefetch landmark, in order (all layers)."""
    from stargz.estargz.reader import open_file

    lay = Layout(str(layout_dir))
    out: list[str] = []
    for layer in layers_of(layout_dir, "go-opt"):
        r = open_file(lay.blob_path(layer["digest"]), verify=False)
        try:
            names = [e.name for e in r.toc.entries]
        finally:
            close = getattr(r, "close", None)
            if close:
                close()
        if LANDMARK not in names:
            continue
        for n in names[: names.index(LANDMARK)]:
            n = n.strip("/").removeprefix("./")
            if n and n not in out and not n.startswith(".prefetch") and n != "stargz.index.json":
                out.append(n)
    return out


def prepare_images(images: list[str], reg: Registry) -> dict:
    """Build/cached OCI layouts with all five forms; return per-image sizes."""
    if not all((CACHE / f"{img}.done").exists() for img in images):
        run(["bash", str(ROOTFS_SH)], timeout=3600)
    info: dict[str, dict] = {}
    py = sys.executable
    for img in images:
        d = CACHE / "oci" / img
        cmd, _ = WORKLOADS[img]
        if not has_tag(d, "orig"):
            log(f"pack {img}")
            shutil.rmtree(d, ignore_errors=True)
            d.parent.mkdir(parents=True, exist_ok=True)
            pack_rootfs(d, "orig", CACHE / img, cmd)
        if not has_tag(d, "ours-noopt"):
            log(f"convert {img} (ours, noopt)")
            run(
                [
                    py,
                    "-m",
                    "stargz.cli.main",
                    "convert",
                    "-q",
                    f"oci:{d}:orig",
                    f"oci:{d}:ours-noopt",
                ],
                timeout=3600,
            )
        if not (has_tag(d, "go-noopt") and has_tag(d, "go-opt")):
            go_convert(img, d, reg)
        for tag, level in (("ours-opt", []), ("ours-opt9", ["--compression-level", "9"])):
            if has_tag(d, tag):
                continue
            prio = prioritized_from_go(d)
            (d / "prioritized.txt").write_text("".join(p + "\n" for p in prio))
            log(f"convert {img} (ours, {tag}: {len(prio)} prioritized files from Go's profile)")
            run(
                [
                    py,
                    "-m",
                    "stargz.cli.main",
                    "convert",
                    "-q",
                    *level,
                    "--prioritized-files",
                    str(d / "prioritized.txt"),
                    f"oci:{d}:orig",
                    f"oci:{d}:{tag}",
                ],
                timeout=3600,
            )
        sizes = {}
        for mode, tag in TAG_OF.items():
            ls = layers_of(d, tag)
            sizes[mode] = sum(x["size"] for x in ls)
        prio_file = d / "prioritized.txt"
        info[img] = {
            "compressed_bytes": sizes,
            "prioritized_files": len(prio_file.read_text().splitlines())
            if prio_file.exists()
            else None,
        }
    return info


def go_convert(img: str, d: Path, reg: Registry) -> None:
    """go-noopt / go-opt with ctr-remote on a scratch containerd; copied back into the layout."""
    cmd, _ = WORKLOADS[img]
    name = f"prep-{img}"
    src = reg.push_oci(d, "orig", f"{name}:orig")
    dummy = make_tempdir("sgz-dummy-")
    with Containerd.start(str(dummy / "none.sock")) as cd:
        a = ["ctr-remote", "-a", cd.address, "-n", "prep"]
        run([*a, "i", "pull", "--plain-http", src], timeout=1200)
        log(f"convert {img} (Go, noopt)")
        run(
            [*a, "i", "convert", "--oci", "--estargz", src, reg.ref(f"{name}:go-noopt")],
            timeout=3600,
        )
        log(f"optimize {img} (Go)")
        run(
            [
                *a,
                "i",
                "optimize",
                "--oci",
                "--period",
                "10",
                "--entrypoint",
                json.dumps(cmd[:1]),
                "--args",
                json.dumps(cmd[1:]),
                src,
                reg.ref(f"{name}:go-opt"),
            ],
            timeout=3600,
        )
        for t in ("go-noopt", "go-opt"):
            run([*a, "i", "push", "--plain-http", reg.ref(f"{name}:{t}")], timeout=1200)
            run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    f"docker://{reg.ref(f'{name}:{t}')}",
                    f"oci:{d}:{t}",
                ],
                timeout=1200,
            )
    shutil.rmtree(dummy, ignore_errors=True)
