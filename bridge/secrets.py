"""Read secret files at push time; keep their contents out of everything we print."""

from __future__ import annotations

import os
from pathlib import Path

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


class SecretError(Exception):
    """A secret file could not be read; the message names the file, never its content."""


def resolve_secret_path(path: Path) -> Path:
    """Relative secret names are credential names in systemd's $CREDENTIALS_DIRECTORY."""
    if path.is_absolute():
        return path
    credentials = os.environ.get(CREDENTIALS_ENV)
    if not credentials:
        raise SecretError(
            f"secret file name {str(path)!r} is relative: use an absolute path, or run under "
            f"systemd with LoadCredential= so that ${CREDENTIALS_ENV} is set"
        )
    return Path(credentials) / path


def read_secret(path: Path) -> str:
    """Return the stripped content of a secret file."""
    resolved = resolve_secret_path(path)
    try:
        value = resolved.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretError(f"cannot read secret file {resolved}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretError(f"secret file {resolved} is not UTF-8 text") from None
    if not value:
        raise SecretError(f"secret file {resolved} is empty")
    if "\0" in value:
        raise SecretError(f"secret file {resolved} contains a NUL byte")
    return value


def redact(text: str, secrets: list[str]) -> str:
    """Replace every occurrence of each secret in text."""
    # Longest first: a secret that contains another is replaced whole.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return text
