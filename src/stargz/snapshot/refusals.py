"""Why layers were not mounted lazily: the last refusals, kept for ``stargz status``.

When the FileSystem refuses a remote snapshot, containerd downloads and unpacks the layer
instead; the log says so once, and an operator asking later needs the reason without
grepping. This keeps the most recent refusals (bounded: one entry per target snapshot,
oldest dropped first) with a stable reason code and a sentence for people.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from stargz.errors import (
    AuthError,
    FooterError,
    FormatError,
    InvalidArgument,
    NotFound,
    NoTOCDigest,
    RegistryError,
    Unavailable,
    VerificationError,
)

#: Refusals kept (one per target snapshot); a node pulls far fewer distinct layers between
#: two looks at ``stargz status``.
MAX_REFUSALS = 256
#: Error messages are cut here (a footer error lists every attempt).
MAX_MESSAGE = 500

#: Reason code -> sentence. The codes are part of ``stargz status --json``: keep them.
REASONS = {
    "no-toc-digest": "not eStargz, or unverifiable: no TOC digest label",
    "not-estargz": "not eStargz: no eStargz footer in the blob",
    "invalid-estargz": "malformed eStargz (TOC or chunks)",
    "verification-failed": "verification failed (TOC digest mismatch)",
    "registry-auth": "registry refused the credentials",
    "registry-not-found": "registry has no such blob or manifest",
    "registry-error": "registry unreachable or failing",
    "bad-labels": "snapshot labels do not name a layer",
    "lazy-disabled": "lazy pulling is off in this daemon",
    "internal": "internal error (see the daemon log)",
}


def reason_of(error: BaseException) -> str:
    """The reason code of a FileSystem refusal (most specific error kind first)."""
    for kind, code in (
        (NoTOCDigest, "no-toc-digest"),
        (FooterError, "not-estargz"),
        (FormatError, "invalid-estargz"),
        (VerificationError, "verification-failed"),
        (AuthError, "registry-auth"),
        (NotFound, "registry-not-found"),
        (RegistryError, "registry-error"),
        (Unavailable, "registry-error"),
        (TimeoutError, "registry-error"),
        (InvalidArgument, "bad-labels"),
    ):
        if isinstance(error, kind):
            return code
    return "internal"


@dataclass
class Refusal:
    """One target snapshot containerd asked for as a remote snapshot and got unpacked.

    ``labels`` are the Prepare's (they name the layer and its image; the FileSystem knows
    which labels those are). ``error`` is the refusal's message as raised: redact it
    before it leaves the daemon."""

    snapshot: str
    key: str
    labels: Mapping[str, str]
    reason: str
    error: str
    time: float
    count: int = 1

    @property
    def reason_text(self) -> str:
        return REASONS.get(self.reason, self.reason)


class Refusals:
    """The last ``limit`` refusals, one per target snapshot, oldest first."""

    def __init__(self, limit: int = MAX_REFUSALS) -> None:
        self.limit = limit
        self._by_snapshot: collections.OrderedDict[str, Refusal] = collections.OrderedDict()
        #: Every refusal since the start, by reason code (the list above forgets; this
        #: does not: Prometheus counts from it)
        self.totals: collections.Counter[str] = collections.Counter()

    def record(
        self, snapshot: str, key: str, labels: Mapping[str, str], reason: str, error: str
    ) -> Refusal:
        old = self._by_snapshot.pop(snapshot, None)
        self.totals[reason] += 1
        r = Refusal(
            snapshot=snapshot,
            key=key,
            labels=dict(labels),
            reason=reason,
            error=error[:MAX_MESSAGE],
            time=time.time(),
            count=1 if old is None else old.count + 1,
        )
        self._by_snapshot[snapshot] = r
        while len(self._by_snapshot) > self.limit:
            self._by_snapshot.popitem(last=False)
        return r

    def forget(self, snapshot: str) -> None:
        """The snapshot is remote after all (a later Prepare mounted it)."""
        self._by_snapshot.pop(snapshot, None)

    def __iter__(self) -> Iterator[Refusal]:
        return iter(list(self._by_snapshot.values()))

    def __len__(self) -> int:
        return len(self._by_snapshot)
