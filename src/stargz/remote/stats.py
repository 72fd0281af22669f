"""Counters for observability (plain attributes; Prometheus wiring reads them later)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class FetchStats:
    """What was sent and received, for one blob or for a whole client.

    ``requests`` counts every HTTP request (probes, retries, each redirect hop, token
    requests on the client); ``bytes_fetched`` counts response body bytes received.
    """

    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    #: GETs for blob bytes carrying a Range header, and those with several ranges.
    range_requests: int = 0
    multi_range_requests: int = 0
    #: Times a multi-range request was refused or misanswered and single ranges were used.
    multi_range_fallbacks: int = 0
    redirects: int = 0
    #: Times a blob moved to the next host (mirror -> next mirror -> registry).
    failovers: int = 0
    #: Connectivity checks that went to the network (not skipped by valid_interval).
    checks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
