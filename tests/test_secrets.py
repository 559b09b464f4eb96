"""bridge/secrets.py: redaction of secrets and of the encodings they are printed in."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus

import pytest

from bridge.backends import outcome_from
from bridge.process import CommandResult
from bridge.secrets import redact

TOKEN = 'eyJhbGciOiJIUzI1NiJ9.c2VjcmV0/tok+en=&?"q'


def encodings(secret: str) -> dict[str, str]:
    data = secret.encode()
    return {
        "plain": secret,
        "base64": base64.b64encode(data).decode(),
        "base64 url-safe": base64.urlsafe_b64encode(data).decode(),
        "base64 unpadded": base64.b64encode(data).decode().rstrip("="),
        "basic auth": base64.b64encode(b"user:" + data).decode(),
        "basic auth, 2-byte user": base64.b64encode(b"us:" + data + b":x").decode(),
        "url-encoded": quote(secret, safe=""),
        "url-encoded, form": quote_plus(secret),
        "url-encoded, lower hex": quote(secret, safe="").lower(),
        "json": json.dumps({"token": secret}),
        "json, ascii": json.dumps({"token": secret + "é"}),
        "hex": data.hex(),
    }


@pytest.mark.parametrize("form", sorted(encodings(TOKEN)))
def test_encoded_forms_of_a_secret_are_redacted(form: str) -> None:
    """Issue 11 finding 10: not only the exact token is caught."""
    encoded = encodings(TOKEN)[form]
    text = redact(f"before {encoded} after", [TOKEN])
    assert "[REDACTED]" in text and text.startswith("before ") and text.endswith(" after")
    # What is left of the encoding gives away at most a couple of bytes at its edges.
    left = text.removeprefix("before ").removesuffix(" after").replace("[REDACTED]", "")
    left = left.removeprefix('{"token": "').removesuffix('"}').removesuffix("\\u00e9")
    assert len(left) <= 12, left
    assert TOKEN not in text


def test_redaction_keeps_unrelated_text_and_short_secrets_only_verbatim() -> None:
    assert redact("nothing to hide here", [TOKEN]) == "nothing to hide here"
    # A two-character secret is redacted as itself, never by its (chance-matching) encodings.
    assert redact("ab YWI= ab", ["ab"]) == "[REDACTED] YWI= [REDACTED]"


def test_backend_errors_are_redacted_in_every_encoding() -> None:
    output = "\n".join(f"debug: {name}: {value}" for name, value in encodings(TOKEN).items())
    result = CommandResult(returncode=1, output=output, duration=0.1)
    outcome = outcome_from(result, "cachix push", [TOKEN])
    assert outcome.error is not None
    for value in encodings(TOKEN).values():
        assert value not in outcome.error
