"""Logging to stderr: timestamps on a terminal, syslog level prefixes under systemd.

Every message is escaped on its way out: text from events (job names, paths, errors of
programs) can hold newlines, terminal escape sequences or bidi controls that would forge
log lines or hide text; they are shown as escapes instead.
"""

from __future__ import annotations

import logging
import os
import sys

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """text with every non-printable character escaped: controls (C0, DEL, C1), line and
    paragraph separators, and format characters such as bidi overrides (U+202E)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


class EscapeArguments(logging.Filter):
    """Escapes a record's text arguments as it is logged, before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace every str argument by its printable form; keep the record."""
        if isinstance(record.args, tuple):
            record.args = tuple(printable(a) if isinstance(a, str) else a for a in record.args)
        return True


def input_logger(name: str) -> logging.Logger:
    """The logger of a module that logs text taken from events, files or other programs:
    its arguments are escaped at the source, so every handler gets safe text."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, EscapeArguments) for f in logger.filters):
        logger.addFilter(EscapeArguments())
    return logger


class EscapingFormatter(logging.Formatter):
    """A formatter that escapes the message and each line of a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        """Format with the message escaped; tracebacks keep their line structure."""
        message = printable(record.getMessage())
        original = record.msg, record.args, record.exc_text
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = "\n".join(printable(line) for line in record.exc_text.split("\n"))
        try:
            return super().format(record)
        finally:
            record.msg, record.args, record.exc_text = original


_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(EscapingFormatter):
    """`<N>message` lines that journald turns into priorities; no timestamps."""

    def format(self, record: logging.LogRecord) -> str:
        """Prefix the priority."""
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def under_journald() -> bool:
    """True when stderr is connected to the journal ($JOURNAL_STREAM matches it)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{info.st_dev}:{info.st_ino}"


def setup_logging(level: str) -> None:
    """Configure the root logger once for the daemon and the commands."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("watchdog").setLevel(logging.WARNING)
