"""Helpers shared by the reliability tests: figures for docs/reliability.md, db reads."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any


def write_report(name: str, data: dict[str, Any]) -> None:
    """Save the figures as JSON in $RELIABILITY_REPORT_DIR, if set."""
    directory = os.environ.get("RELIABILITY_REPORT_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the daemon's queue database without writing to it."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def unmount(path: Path) -> None:
    """Unmount a test mount; if still busy (a daemon not yet reaped), detach it now."""
    done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
