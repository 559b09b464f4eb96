"""The benchmark runner's smoke mode: every scenario runs end to end with tiny sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_writes_every_scenario(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--output", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
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
