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


HOSTILE = (
    "import logging\n"
    "from bridge.logsetup import setup_logging\n"
    "setup_logging('info')\n"
    "log = logging.getLogger('bridge.x')\n"
    "log.warning('job %s done', 'pkg\\n<3>forged: FAKE\\x1b[2J\\u202eexe.txt\\u2028x')\n"
    "try:\n"
    "    raise ValueError('bad\\x1b]0;title\\x07')\n"
    "except ValueError:\n"
    "    log.exception('failed')\n"
)


def test_control_and_bidi_characters_from_events_are_escaped(tmp_path: Path) -> None:
    """Issue 11 finding 10: Hydra names cannot forge log lines or hide text."""
    for journal in (True, False):
        log = tmp_path / f"hostile-{journal}"
        with log.open("wb") as handle:
            info = os.fstat(handle.fileno())
            env = dict(os.environ)
            env.pop("JOURNAL_STREAM", None)
            if journal:
                env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
            subprocess.run([sys.executable, "-c", HOSTILE], stderr=handle, env=env, check=True)
        text = log.read_text(encoding="utf-8")
        for raw in ("\x1b", "\u202e", "\u2028", "\x07"):
            assert raw not in text
        lines = text.splitlines()
        assert lines[0].endswith(
            "bridge.x: job pkg\\n<3>forged: FAKE\\x1b[2J\\u202eexe.txt\\u2028x done"
        )
        assert not any(line.startswith("<3>forged") for line in lines)
        assert "ValueError: bad\\x1b]0;title\\x07" in text  # the traceback keeps its lines
        assert any(line.startswith("Traceback") for line in lines)


def test_an_input_logger_escapes_its_arguments_before_any_handler() -> None:
    import logging

    from bridge.logsetup import input_logger

    logger = input_logger("bridge.test_input_logger")
    assert input_logger("bridge.test_input_logger") is logger
    assert len(logger.filters) == 1  # asking twice adds no second filter
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("file %s, %d byte(s)", "a\n2026 INFO forged\x1b[2K\u202e", 3)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "file a\\n2026 INFO forged\\x1b[2K\\u202e, 3 byte(s)"
    ]
