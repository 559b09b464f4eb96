"""Race probe: with HCB_RACE_PROBE=SECONDS, every metric update, log record, SQLite commit,
unlink and rename made off the main thread waits that long first.

A test that waits for one write (a row, a file, a metric) and then reads another that the
code under test makes a moment later passes almost always and fails once in a while, under
load, in CI. With the probe on, the later write is late every time, so such a test fails
every time. Run the suite with it before trusting a new test that waits on threads:

    HCB_RACE_PROBE=0.05 python -m pytest -p tests.raceprobe ...

Subprocesses the tests start (the daemon, the hook) get it too, through sitecustomize.py in
this package's `site` directory, which the plugin puts first on PYTHONPATH.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

ENV = "HCB_RACE_PROBE"
SITE = Path(__file__).parent / "site"


def delay() -> float:
    """The probe's delay in seconds, 0 when it is off."""
    raw = os.environ.get(ENV, "").strip()
    try:
        seconds = float(raw or 0)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 60:
        raise ValueError(f"{ENV}={raw!r}: expected a delay in seconds, such as 0.05")
    return seconds


def _late(seconds: float) -> None:
    if threading.current_thread() is not threading.main_thread():
        time.sleep(seconds)


def _delay_before(owner: Any, name: str, seconds: float) -> None:
    """Replace owner.name by a wrapper that waits off the main thread first (once)."""
    original = getattr(owner, name)
    if getattr(original, "_race_probe", False):
        return

    def late(*args: Any, **kwargs: Any) -> Any:
        _late(seconds)
        return original(*args, **kwargs)

    late._race_probe = True  # type: ignore[attr-defined]
    setattr(owner, name, late)


def install() -> bool:
    """Make metric values, log records, commits and file moves late off the main thread."""
    seconds = delay()
    if not seconds:
        return False
    from prometheus_client import values

    for name in ("inc", "set"):
        _delay_before(values.MutexValue, name, seconds)
    _delay_before(logging.Logger, "handle", seconds)
    for name in ("unlink", "remove", "rename", "replace"):
        _delay_before(os, name, seconds)
    if not getattr(sqlite3.connect, "_race_probe", False):
        connect = sqlite3.connect

        class LateCommit(sqlite3.Connection):
            def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
                if sql.lstrip()[:6].upper() == "COMMIT":
                    _late(seconds)
                return super().execute(sql, *args)

        def late_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            kwargs.setdefault("factory", LateCommit)
            return connect(*args, **kwargs)

        late_connect._race_probe = True  # type: ignore[attr-defined]
        sqlite3.connect = late_connect  # type: ignore[assignment]
    return True


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Skip the tests that time the daemon: the probe slows it down on purpose."""
    if not delay():
        return
    import pytest

    skip = pytest.mark.skip(reason=f"{ENV} slows the daemon down: timing tests are off")
    for item in items:
        if item.get_closest_marker("timing"):
            item.add_marker(skip)


def pytest_configure(config: Any) -> None:
    """Install the probe here and in every subprocess the tests start."""
    import pytest

    try:
        installed = install()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if installed:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(SITE), os.environ.get("PYTHONPATH", "")])
        )
