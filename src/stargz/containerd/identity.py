"""Chain IDs (OCI image-spec ``identity.ChainID``): the name of the committed snapshot that
holds layers 0..i applied in order.

``chain[0] = diff_id[0]``; ``chain[i] = sha256(chain[i-1] + " " + diff_id[i])``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID after each layer."""
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out
