"""Reliability tests reuse the integration fixtures (a daemon subprocess per test) and
collect per-scenario observations for docs/reliability.md."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import daemon_factory
from tests.reliability.reporting import write_report

__all__ = ["daemon_factory", "report"]

_SCENARIOS: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Observations of one scenario; its outcome is filled in after the test ran."""
    failed_before = request.session.testsfailed
    entry: dict[str, Any] = {"scenario": request.node.name, "observations": {}}
    yield entry["observations"]
    entry["outcome"] = "failed" if request.session.testsfailed > failed_before else "passed"
    _SCENARIOS.setdefault(request.module.__name__.rsplit(".", 1)[-1], []).append(entry)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write one JSON file per test module that recorded scenarios."""
    for module, scenarios in _SCENARIOS.items():
        write_report(
            f"{module}.json", {"file": f"tests/reliability/{module}.py", "scenarios": scenarios}
        )
