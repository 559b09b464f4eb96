"""The race probe (tests/raceprobe) delays writes off the main thread, in subprocesses too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.raceprobe import ENV, SITE

PROGRAM = """
import os, sqlite3, sys, threading, time
import prometheus_client, logging
counter = prometheus_client.Counter("probed", "a counter")
conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
path = sys.argv[1]

def writes():
    counter.inc()
    logging.getLogger("probed").warning("a record")
    conn.execute("BEGIN")
    conn.execute("COMMIT")
    open(path, "w").close()
    os.unlink(path)

def timed(target):
    started = time.monotonic()
    target()
    return time.monotonic() - started

def in_thread():
    thread = threading.Thread(target=writes)
    thread.start()
    thread.join()

print(f"{timed(writes):.3f} {timed(in_thread):.3f}")
"""


def run(tmp_path: Path, probe: str) -> tuple[float, float]:
    env = {**os.environ, ENV: probe, "PYTHONPATH": str(SITE)}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path / "moved")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    main, thread = done.stdout.split()
    return float(main), float(thread)


def test_the_probe_delays_each_write_off_the_main_thread_in_a_subprocess(tmp_path: Path) -> None:
    main, thread = run(tmp_path, "1")
    # Four writes delayed off the main thread (metric, log record, commit, unlink); none on
    # it (a whole second apart, so a loaded machine does not blur the two).
    assert thread >= 4.0
    assert main < 1.0


def test_without_the_probe_nothing_is_delayed(tmp_path: Path) -> None:
    main, thread = run(tmp_path, "")
    assert thread < 1.0 and main < 1.0


def test_the_hook_fast_path_stays_free_of_prometheus_under_the_probe() -> None:
    env = {**os.environ, ENV: "0.1", "PYTHONPATH": str(SITE)}
    done = subprocess.run(
        [sys.executable, "-c", "import sys, logging; print('prometheus_client' in sys.modules)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("value", ["abc", "-1", "3600"])
def test_a_bad_delay_is_a_clear_error(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.raceprobe import delay

    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=f"{ENV}=.*expected a delay in seconds"):
        delay()
