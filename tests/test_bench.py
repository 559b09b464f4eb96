"""The benchmark runner's smoke mode: every scenario runs end to end with tiny sizes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_writes_every_scenario(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    # Its own session, killed whole in the end: a runner stopped by a timeout must not leave
    # the daemons it started running (one kept a chroot's /dev busy after a hang).
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--output", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=280)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    text = report.read_text()
    assert "Smoke run with tiny sizes" in text
    for title in (
        "1. Build-loop cost",
        "2. hydra-notify cost",
        "3. Detection latency",
        "4. Ingest throughput",
        "5. Drain throughput",
        "6. Scale",
        "7. Memory",
    ):
        assert f"## {title}" in text, title
    for line in ("- date: ", "- commit: ", "- machine: ", "- software: Python"):
        assert line in text
    # Every targeted figure was measured (a row per target, with a yes/no verdict).
    verdicts = [row for row in text.splitlines() if row.endswith(("| yes |", "| **no** |"))]
    assert len(verdicts) >= 10
