"""The fault matrix, reduced for CI: each fault of ``harness.faultmatrix`` marked ``ci``,
on a fresh daemon, with a few dozen reads and a short registry outage (``ci/faults.sh``
runs all of them, every file, and a minute without the registry).

Each test fails with the fault's row and the daemon's log when an invariant breaks: a
wrong byte, a hang, a crash, an error other than EIO, a slice still unreadable after the
fault, a failed read of the other layer, or an EIO under a fault that retries get past.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness.faultmatrix import Timing, Trial, World, faults, table

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(120)]

TIMING = Timing()
#: Seconds the registry is gone in CI (a minute in ci/faults.sh).
OUTAGE_SEC = 3
READS = 24
CI_FAULTS = [f for f in faults(TIMING, OUTAGE_SEC) if f.ci]


@pytest.fixture(scope="module")
def world(e2e_host: None) -> Iterator[World]:
    w = World(TIMING, READS)
    try:
        yield w
    finally:
        w.close()


def test_the_reduced_set_covers_network_and_node_faults() -> None:
    names = {f.name for f in CI_FAULTS}
    assert {"reset", "registry gone", "cache disk full", "containerd restart"} <= names
    assert len(CI_FAULTS) >= 10


@pytest.mark.parametrize("fault", CI_FAULTS, ids=[f.name.replace(" ", "-") for f in CI_FAULTS])
def test_reads_under_a_fault_keep_the_invariants(world: World, fault) -> None:
    trial = Trial(world, fault)
    row = trial.run()
    bad = row.violations()
    log = trial.daemon.log_text()[-3000:] if trial.daemon is not None else ""
    assert not bad, f"{table([row])}\nnotes: {row.notes[:10]}\n--- daemon log ---\n{log}"
    if fault.name not in ("registry gone", "cache read-only", "containerd restart"):
        assert row.injected > 0, f"the fault was never injected:\n{table([row])}"
