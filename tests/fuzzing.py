"""Budgets of the fuzz tests (``-m fuzz``): small and fixed in CI, bigger on demand.

CI (``ci/test.sh``) loads the ``ci`` hypothesis profile (`conftest`): derandomized and
without an example database, so a failure there is found again by the same command.
`fuzz_settings` scales each test's example count by ``STARGZ_FUZZ_SCALE`` (default 1) and
`fuzz_timeout` its hard time limit with it; ``ci/fuzz.sh SECONDS`` raises the scale and
runs round after round with fresh seeds until its time budget is spent.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

#: Multiplies every fuzz test's example count and timeout (``ci/fuzz.sh`` sets it).
SCALE = float(os.environ.get("STARGZ_FUZZ_SCALE", "1"))


def fuzz_settings(max_examples: int, *, deadline_s: float | None = 5.0, **kw: Any) -> settings:
    """``max_examples`` (times `SCALE`) with a per-example deadline; slow data
    generation is expected here (whole layers are mutated), so that check is off."""
    return settings(
        max_examples=max(1, int(max_examples * SCALE)),
        deadline=None if deadline_s is None else datetime.timedelta(seconds=deadline_s),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
        **kw,
    )


def fuzz_timeout(seconds: float) -> pytest.MarkDecorator:
    """A hard limit for one fuzz test (a hang fails it), scaled with the example count."""
    return pytest.mark.timeout(int(seconds * max(SCALE, 1.0)))
