"""Put the licenses of the libraries auditwheel bundled into the wheel itself.

    python ci/wheel_licenses.py dist/stargz-...-manylinux_*.whl

The wheel redistributes ISA-L (BSD-3-Clause), libzstd (BSD) and libcrypto (Apache-2.0)
binaries, and those licenses ask for their notices to travel with the binaries. auditwheel's
SBOM (``*.dist-info/sboms/auditwheel.cdx.json``) names the Debian package each copy came
from; that package's ``/usr/share/doc/<package>/copyright`` is added as
``*.dist-info/licenses/stargz.libs/<package>.copyright`` and RECORD is rewritten to match.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

DOC = Path("/usr/share/doc")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def bundled_packages(wheel: zipfile.ZipFile) -> list[str]:
    """The Debian packages auditwheel copied libraries from, per its SBOM."""
    (sbom,) = [n for n in wheel.namelist() if n.endswith(".dist-info/sboms/auditwheel.cdx.json")]
    doc = json.loads(wheel.read(sbom))
    return sorted(
        c["name"] for c in doc.get("components", []) if c.get("purl", "").startswith("pkg:deb/")
    )


def add_licenses(path: Path) -> list[str]:
    """Rewrite the wheel at ``path`` with the copyright files added; returns their names."""
    with zipfile.ZipFile(path) as src:
        packages = bundled_packages(src)
        (record,) = [n for n in src.namelist() if n.endswith(".dist-info/RECORD")]
        dist_info = record.rsplit("/", 1)[0]
        added = {
            f"{dist_info}/licenses/stargz.libs/{p}.copyright": (DOC / p / "copyright").read_bytes()
            for p in packages
        }
        tmp = path.with_suffix(".tmp")
        lines = [
            line
            for line in src.read(record).decode().splitlines()
            if line and not line.startswith(f"{record},")
        ]
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename not in (record, *added):
                    dst.writestr(info, src.read(info))
            for name, data in added.items():
                dst.writestr(name, data)
                lines.append(_record_line(name, data))
            dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    os.replace(tmp, path)
    return list(added)


def main(argv: list[str]) -> int:
    for arg in argv:
        names = [n.rsplit("/", 1)[1] for n in add_licenses(Path(arg))]
        print(f"ci/wheel: {Path(arg).name}: added {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
