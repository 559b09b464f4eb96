"""bridge/logsetup.py: journald-friendly lines under systemd, timestamps elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = (
    "import logging\n"
    "from bridge.logsetup import setup_logging\n"
    "setup_logging('info')\n"
    "logging.getLogger('bridge.x').info('hello')\n"
    "logging.getLogger('bridge.x').error('broken')\n"
    "logging.getLogger('bridge.x').debug('hidden')\n"
)


def run_probe(tmp_path: Path, journal: bool) -> list[str]:
    log = tmp_path / f"stderr-{journal}"
    with log.open("wb") as handle:
        info = os.fstat(handle.fileno())
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        subprocess.run([sys.executable, "-c", PROBE], stderr=handle, env=env, check=True)
    return log.read_text().splitlines()


def test_under_journald_lines_carry_priorities_and_no_timestamps(tmp_path: Path) -> None:
    assert run_probe(tmp_path, journal=True) == ["<6>bridge.x: hello", "<3>bridge.x: broken"]


def test_on_a_terminal_lines_carry_time_and_level(tmp_path: Path) -> None:
    lines = run_probe(tmp_path, journal=False)
    assert len(lines) == 2
    assert lines[0].endswith(" INFO bridge.x: hello") and lines[0][:4].isdigit()
    assert lines[1].endswith(" ERROR bridge.x: broken")
