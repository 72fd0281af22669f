"""The HelloBench images: python, gcc, nginx, node and python-12l in every form the modes pull.

``rootfs.sh`` builds the Debian minbase root filesystems once (debootstrap, under
``$STARGZ_BENCH_CACHE``, default /var/cache/stargz-bench); :func:`prepare_images` packs each
into a gzip image (tag ``orig``: one layer, or 12 for ``python-12l``, the python tree cut
into 12 layers of about equal size) and converts it with our converter and optimizer and
Go's, all in the OCI layout ``<cache>/oci/<image>``. Only missing tags are built.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from benchmarks._images import write_image
from benchmarks.common import CACHE, log
from stargz.estargz.writer import DEFAULT_GZIP_LEVEL as GZIP_LEVEL
from stargz.image.layout import Layout
from tests.harness.procs import Containerd, Registry, make_tempdir, run

ROOTFS_SH = Path(__file__).resolve().parent / "rootfs.sh"

#: The modes bench_hellobench.py runs by default, and the extra ones it runs when named.
MODES = ["legacy", "ours-noopt", "ours-opt", "go-noopt", "go-opt", "ours-on-go-opt", "ours-all-opt"]
EXTRA_MODES = ["ours-opt9", "ours-opt-pt", "ours-opt-nohs", "ours-all-opt-wait", "ours-opt-s1"]
TAG_OF = {
    "ours-all-opt": "ours-all-opt",
    "legacy": "orig",
    "ours-noopt": "ours-noopt",
    "ours-opt": "ours-opt",
    "go-noopt": "go-noopt",
    "go-opt": "go-opt",
    "ours-opt9": "ours-opt9",
    "ours-on-go-opt": "go-opt",
    "ours-opt-pt": "ours-opt",
    "ours-opt-nohs": "ours-opt",
    "ours-all-opt-wait": "ours-all-opt",
    "ours-opt-s1": "ours-opt",
}
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: image -> (command, ready line)
WORKLOADS: dict[str, tuple[list[str], str]] = {
    "python": (["python3", "-c", "print('hello')"], "hello"),
    "gcc": (["sh", "-c", "gcc -o /tmp/hello /hello.c && /tmp/hello"], "hello"),
    # nginx opens its listening sockets before it daemonizes: the parent's exit means ready.
    "nginx": (["sh", "-c", "nginx && echo ready && exec sleep 3600"], "ready"),
    "node": (["node", "-e", 'console.log("hello")'], "hello"),
    "python-12l": (["python3", "-c", "print('hello')"], "hello"),
}
#: image -> (root filesystem under CACHE, number of layers of its ``orig`` form)
ROOTFS_OF: dict[str, tuple[str, int]] = {
    "python": ("python", 1),
    "gcc": ("gcc", 1),
    "nginx": ("nginx", 1),
    "node": ("node", 1),
    "python-12l": ("python", 12),
}
LANDMARK = ".prefetch.landmark"


def _walk(root: Path) -> list[tuple[str, str, bool]]:
    """(path, name in the archive, is a directory) for the whole tree, parents first."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            out.append((dirpath, rel, True))
        for name in sorted(
            filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        ):
            p = os.path.join(dirpath, name)
            out.append((p, name if rel == "." else os.path.join(rel, name), False))
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


def _tar_gz(entries: list[tuple[str, str, bool]]) -> tuple[bytes, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for p, arc, _ in entries:
            tf.add(p, arcname=arc, recursive=False)
    return raw.getvalue(), gzip.compress(raw.getvalue(), 6, mtime=0)


def _split(entries: list[tuple[str, str, bool]], n: int) -> list[list[tuple[str, str, bool]]]:
    """``n`` layers of about equal file bytes, in tree order; each layer carries the parent
    directories of what it holds (a hard link whose target landed in another layer becomes a
    copy: each layer is its own tar)."""
    if n <= 1:
        return [entries]
    dirs = {arc: (p, arc, True) for p, arc, d in entries if d}
    files = [e for e in entries if not e[2]]
    sizes = [os.lstat(p).st_size for p, _, _ in files]
    total, acc, cut = sum(sizes), 0, 0
    groups: list[list[tuple[str, str, bool]]] = [[] for _ in range(n)]
    for e, size in zip(files, sizes, strict=True):
        groups[cut].append(e)
        acc += size
        if cut < n - 1 and acc >= total * (cut + 1) / n:
            cut += 1
    out = []
    for i, g in enumerate(groups):
        need: set[str] = set(dirs) if i == 0 else set()  # every directory once, in the base
        for _, arc, _ in g:
            parent = os.path.dirname(arc)
            while parent and parent not in need:
                need.add(parent)
                parent = os.path.dirname(parent)
        out.append([dirs[a] for a in sorted(need, key=lambda a: (a.count("/"), a))] + g)
    return out


def pack_rootfs(layout_dir: Path, tag: str, root: Path, cmd: list[str], layers: int = 1) -> dict:
    """Gzip OCI image of ``root`` in ``layers`` layers (the 'original' form)."""
    return write_image(
        str(layout_dir),
        tag,
        (_tar_gz(part) for part in _split(_walk(root), layers)),
        {"Cmd": cmd, "Env": [PATH_ENV], "WorkingDir": "/"},
    )


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


def prefetch_bytes(layout_dir: Path, tag: str) -> dict:
    """What a lazy pull of ``tag`` must fetch at least: per layer the bytes before its
    prefetch landmark (0 without one) and its footer + TOC; summed, with manifest and
    config sizes."""
    from stargz.estargz.reader import open_file

    lay = Layout(str(layout_dir))
    mdesc = lay.resolve(tag)
    manifest = lay.read_json(mdesc["digest"])
    pre, toc = [], []
    for layer in manifest["layers"]:
        try:
            r = open_file(lay.blob_path(layer["digest"]), verify=False)
        except Exception:  # not eStargz: the whole blob
            pre.append(layer["size"])
            toc.append(0)
            continue
        try:
            pre.append(r.prefetch_size or 0)
            toc.append(layer["size"] - r.footer.toc_offset)
        finally:
            r.close()
    return {
        "layers": len(pre),
        "prefetch_bytes": sum(pre),
        "toc_footer_bytes": sum(toc),
        "manifest_bytes": mdesc["size"],
        "config_bytes": manifest["config"]["size"],
        "per_layer_prefetch": pre,
    }


def _stargz(*argv: str) -> None:
    run([sys.executable, "-m", "stargz.cli.main", *argv], timeout=3600)


def _built(d: Path, tag: str) -> bool:
    """``tag`` exists and was made at the converter's current default gzip level (a cached
    image from an older default is made again)."""
    stamp = d / f"{tag}.level"
    return has_tag(d, tag) and stamp.exists() and stamp.read_text().strip() == str(GZIP_LEVEL)


def _stamp(d: Path, tag: str) -> None:
    (d / f"{tag}.level").write_text(f"{GZIP_LEVEL}\n")


def prepare_images(images: list[str], reg: Registry) -> dict:
    """Build/cached OCI layouts with all forms; return per-image sizes."""
    if not all((CACHE / f"{ROOTFS_OF[img][0]}.done").exists() for img in images):
        run(["bash", str(ROOTFS_SH)], timeout=3600)
    info: dict[str, dict] = {}
    for img in images:
        d = CACHE / "oci" / img
        cmd, _ = WORKLOADS[img]
        rootfs, nlayers = ROOTFS_OF[img]
        if not has_tag(d, "orig"):
            log(f"pack {img} ({nlayers} layer(s))")
            shutil.rmtree(d, ignore_errors=True)
            d.parent.mkdir(parents=True, exist_ok=True)
            pack_rootfs(d, "orig", CACHE / rootfs, cmd, nlayers)
        if not _built(d, "ours-noopt"):
            log(f"convert {img} (ours, noopt)")
            _stargz("convert", "-q", f"oci:{d}:orig", f"oci:{d}:ours-noopt")
            _stamp(d, "ours-noopt")
        if not (has_tag(d, "go-noopt") and has_tag(d, "go-opt")):
            go_convert(img, d, reg)
        if not _built(d, "ours-all-opt"):
            log(f"optimize {img} (ours: stargz optimize, the workload under runc)")
            t0 = time.perf_counter()
            _stargz(
                "optimize",
                "-q",
                "--period",
                "10",
                "--entrypoint",
                json.dumps(cmd[:1]),
                "--args",
                json.dumps(cmd[1:]),
                "--record-out",
                str(d / "ours-all-opt.record.jsonl"),
                f"oci:{d}:orig",
                f"oci:{d}:ours-all-opt",
            )
            (d / "ours-all-opt.seconds").write_text(f"{time.perf_counter() - t0:.3f}\n")
            _stamp(d, "ours-all-opt")
        for tag, level in (("ours-opt", []), ("ours-opt9", ["--compression-level", "9"])):
            if _built(d, tag):
                continue
            prio = prioritized_from_go(d)
            (d / "prioritized.txt").write_text("".join(p + "\n" for p in prio))
            log(f"convert {img} (ours, {tag}: {len(prio)} prioritized files from Go's profile)")
            _stargz(
                "convert",
                "-q",
                *level,
                "--prioritized-files",
                str(d / "prioritized.txt"),
                f"oci:{d}:orig",
                f"oci:{d}:{tag}",
            )
            _stamp(d, tag)
        sizes = {}
        for mode, tag in TAG_OF.items():
            ls = layers_of(d, tag)
            sizes[mode] = sum(x["size"] for x in ls)
        prio_file = d / "prioritized.txt"
        rec = d / "ours-all-opt.record.jsonl"
        secs = d / "ours-all-opt.seconds"
        info[img] = {
            "layers": len(layers_of(d, "orig")),
            "compressed_bytes": sizes,
            "prioritized_files": len(prio_file.read_text().splitlines())
            if prio_file.exists()
            else None,
            "ours_all_opt_recorded_files": len(rec.read_text().splitlines())
            if rec.exists()
            else None,
            "ours_optimize_seconds": float(secs.read_text()) if secs.exists() else None,
            "need": {tag: prefetch_bytes(d, tag) for tag in ("ours-all-opt", "go-opt")},
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
