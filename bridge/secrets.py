"""Read secret files at push time; keep their contents out of everything we print."""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from urllib.parse import quote, quote_plus

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


# Encoded copies shorter than this are not redacted on their own: they would match text
# by chance (a short token's base64 core can be a few characters).
MIN_ENCODED_LENGTH = 8


def _base64_cores(data: bytes) -> set[str]:
    """Substrings that appear in any base64 text (standard or URL-safe alphabet) that
    encodes data, wherever data starts within the encoded bytes (3 alignments): e.g. the
    token inside `Authorization: Basic base64(user:token)`."""
    cores: set[str] = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data).decode("ascii").rstrip("=")
        # Characters mixing prefix bytes and the first bytes of data: 0, or 2-3 for the
        # group shared with the prefix; likewise the last group may mix with what follows.
        start = 0 if offset == 0 else 4
        full = (offset + len(data)) // 3 * 4
        end = len(encoded) if (offset + len(data)) % 3 == 0 else full
        core = encoded[start:end]
        if len(core) >= MIN_ENCODED_LENGTH:
            cores.add(core)
            cores.add(core.replace("+", "-").replace("/", "_"))
    return cores


def secret_forms(secret: str) -> set[str]:
    """The secret and the encodings the daemon or its children may print it in: base64
    (at any alignment, both alphabets), URL-encoding (%XX and +), hex, JSON-escaped."""
    forms = {secret}
    data = secret.encode("utf-8")
    forms.add(json.dumps(secret)[1:-1])
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    for encoded in (quote(secret, safe=""), quote_plus(secret, safe=""), quote(secret)):
        forms.add(encoded)
        forms.add(encoded.lower() if "%" in encoded else encoded)
    forms.add(binascii.hexlify(data).decode("ascii"))
    for whole in (base64.b64encode(data), base64.urlsafe_b64encode(data)):
        forms.add(whole.decode("ascii"))  # the whole encoding, padding included
    forms.update(_base64_cores(data))
    return {form for form in forms if form == secret or len(form) >= MIN_ENCODED_LENGTH}


def redact(text: str, secrets: list[str]) -> str:
    """Replace every occurrence of each secret, and of its encoded forms, in text."""
    forms: set[str] = set()
    for secret in secrets:
        if secret:
            forms.update(secret_forms(secret))
    # Longest first: a secret (or encoding) that contains another is replaced whole.
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "[REDACTED]")
    return text
