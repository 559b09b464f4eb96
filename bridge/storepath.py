"""Validation of Nix store paths coming from untrusted event data."""

from __future__ import annotations

import re

STORE_DIR = "/nix/store"
# Nix's base-32 alphabet (no e, o, u, t) and the characters Nix allows in a name.
_STORE_PATH_RE = re.compile(r"/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]{1,211}")


def is_store_path(value: object) -> bool:
    """Return True if value is a top-level Nix store path (not a file inside one)."""
    return (
        isinstance(value, str)
        and _STORE_PATH_RE.fullmatch(value) is not None
        and not path_name(value).startswith(".")
    )


def is_derivation_path(value: object) -> bool:
    """Return True if value is a store path naming a derivation."""
    return is_store_path(value) and isinstance(value, str) and value.endswith(".drv")


def path_name(path: str) -> str:
    """Return the name part of a store path (after the hash and dash)."""
    return path[len(STORE_DIR) + 1 + 32 + 1 :]
