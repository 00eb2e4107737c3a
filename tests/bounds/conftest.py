"""Session-level count of sampled soundness checks of the bound engine.

Every soundness test adds the number of (input, weight) points it evaluated
to ``COUNTER["points"]`` through the ``soundness_counter`` fixture. At the end
of a session that ran all collected soundness tests the total is printed and
must reach ``MIN_POINTS`` (10^5), otherwise the session fails.
"""

from __future__ import annotations

import pytest

MIN_POINTS = 100_000
COUNTER = {"points": 0, "values": 0, "collected": 0, "ran": 0}


@pytest.fixture
def soundness_counter():
    yield COUNTER
    COUNTER["ran"] += 1


def pytest_collection_modifyitems(config, items):
    COUNTER["collected"] = sum("soundness_counter" in getattr(i, "fixturenames", ()) for i in items)


def pytest_terminal_summary(terminalreporter):
    if COUNTER["ran"]:
        terminalreporter.write_line(
            f"bounds soundness: {COUNTER['points']} sampled points ({COUNTER['values']} output values) "
            f"checked in {COUNTER['ran']} tests"
        )


def pytest_sessionfinish(session, exitstatus):
    full = COUNTER["collected"] >= 20 and COUNTER["ran"] == COUNTER["collected"]
    if full and COUNTER["points"] < MIN_POINTS and exitstatus == 0:
        print(f"\nbounds soundness: only {COUNTER['points']} sampled points, need >= {MIN_POINTS}")
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one thread avoids oversubscription stalls on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
