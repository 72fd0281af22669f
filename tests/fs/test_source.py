"""Layer specs from snapshot labels: which labels name a layer, and the verification rules."""

from __future__ import annotations

import pytest

from stargz.errors import InvalidArgument
from stargz.fs import layer_spec
from stargz.fs.source import (
    CRI_IMAGE_LAYERS_LABEL,
    CRI_IMAGE_REF_LABEL,
    CRI_LAYER_DIGEST_LABEL,
    PREFETCH_SIZE_LABEL,
    SKIP_VERIFY_LABEL,
    STARGZ_DIGEST_LABEL,
    STARGZ_REFERENCE_LABEL,
    TOC_DIGEST_LABEL,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
TOC = "sha256:" + "a" * 64


def test_labels_cri_first_then_stargz():
    both = {
        CRI_IMAGE_REF_LABEL: "reg/cri:1",
        CRI_LAYER_DIGEST_LABEL: D1,
        CRI_IMAGE_LAYERS_LABEL: f"{D1},{D2}",
        STARGZ_REFERENCE_LABEL: "reg/sgz:1",
        STARGZ_DIGEST_LABEL: D2,
        TOC_DIGEST_LABEL: TOC,
        PREFETCH_SIZE_LABEL: "10485760",
    }
    spec = layer_spec(both)
    assert (spec.ref, spec.digest, spec.toc_digest) == ("reg/cri:1", D1, TOC)
    assert spec.prefetch_size == 10 << 20 and spec.neighbours == (D2,)
    only_stargz = {k: v for k, v in both.items() if not k.startswith("containerd.io/snapshot/cri")}
    spec = layer_spec(only_stargz)
    assert (spec.ref, spec.digest) == ("reg/sgz:1", D2)


def test_labels_verification_rules():
    base = {STARGZ_REFERENCE_LABEL: "r/x:1", STARGZ_DIGEST_LABEL: D1}
    with pytest.raises(InvalidArgument, match="digest of TOC JSON must be passed"):
        layer_spec(base)
    with pytest.raises(InvalidArgument, match="digest of TOC JSON must be passed"):
        layer_spec({**base, SKIP_VERIFY_LABEL: "true"})  # not allowed by config
    assert layer_spec({**base, SKIP_VERIFY_LABEL: "true"}, allow_no_verification=True).skip_verify
    assert layer_spec(base, disable_verification=True).toc_digest is None
    with pytest.raises(InvalidArgument, match="no layer source"):
        layer_spec({TOC_DIGEST_LABEL: TOC})
    with pytest.raises(InvalidArgument, match="not a sha256"):
        layer_spec({**base, STARGZ_DIGEST_LABEL: "sha256:xyz", TOC_DIGEST_LABEL: TOC})
    with pytest.raises(InvalidArgument, match="not an integer"):
        layer_spec({**base, TOC_DIGEST_LABEL: TOC, PREFETCH_SIZE_LABEL: "lots"})
