"""Host checks for `check-config`: will this config work here, as this user, right now?"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bridge.backends import BACKEND_KINDS
from bridge.config import CacheConfig, Config, store_scheme
from bridge.secrets import SecretError, read_secret

SECRET_KEYS = ("auth_token_file", "signing_key_file", "cachix_config")

Which = Callable[[str, str | None], str | None]


def _which(name: str, path: str | None) -> str | None:
    return shutil.which(name, path=path)


def check_host(
    config: Config, environ: Mapping[str, str] | None = None, which: Which = _which
) -> list[str]:
    """Every reason the config cannot work on this host, as `FILE:KEY: message` lines."""
    env = os.environ if environ is None else environ
    file = str(config.source_file) if config.source_file is not None else "<defaults>"
    problems: list[tuple[str, str]] = []
    problems += _directory_problem("state_dir", config.state_dir, "the queue database")
    problems += _directory_problem("spool_dir", config.spool_dir, "the spool")
    for name, cache in config.caches.items():
        problems += _secret_problems(name, cache)
        problems += _executable_problems(name, cache, env.get("PATH"), which)
        directory = file_cache_directory(cache)
        if directory is not None:
            problems += _directory_problem(f"caches.{name}.uri", directory, "the binary cache")
    for key in ("tls_cert_file", "tls_key_file"):
        path = getattr(config.metrics, key)
        if path is not None and not os.access(path, os.R_OK):
            problems.append((f"metrics.{key}", f"cannot read {path}: {_why_not(path)}"))
    return [f"{file}:{key}: {message}" for key, message in problems]


def file_cache_directory(cache: CacheConfig) -> Path | None:
    """The directory of a `file://` nix-copy cache, else None."""
    if cache.backend != "nix-copy" or not cache.uri or store_scheme(cache.uri) != "file":
        return None
    path = unquote(urlsplit(cache.uri).path)
    return Path(path) if path else None


def _secret_problems(name: str, cache: CacheConfig) -> list[tuple[str, str]]:
    problems = []
    for key in SECRET_KEYS:
        path = getattr(cache, key)
        if path is None:
            continue
        try:
            read_secret(path)  # the content is dropped at once, never shown
        except SecretError as exc:
            problems.append((f"caches.{name}.{key}", str(exc)))
    return problems


def _executable_problems(
    name: str, cache: CacheConfig, path: str | None, which: Which
) -> list[tuple[str, str]]:
    program = cache.executable or BACKEND_KINDS[cache.backend].executable
    if program is None:
        return []
    key = f"caches.{name}.executable" if cache.executable else f"caches.{name}.backend"
    if os.sep in program:
        target = Path(program)
        if not target.is_file():
            return [(key, f"{program} does not exist or is not a file")]
        if not os.access(target, os.X_OK):
            return [(key, f"{program} is not executable by this user")]
        return []
    if which(program, path) is None:
        hint = "" if cache.executable else f", or set caches.{name}.executable to its path"
        return [(key, f"{program!r} is not on PATH ({path or 'unset'}): install it{hint}")]
    return []


def _directory_problem(key: str, directory: Path, what: str) -> list[tuple[str, str]]:
    """A directory must be writable, or creatable under its nearest existing parent."""
    if directory.exists():
        if not directory.is_dir():
            return [(key, f"{directory} ({what}) exists and is not a directory")]
        if not os.access(directory, os.W_OK | os.X_OK):
            return [(key, f"{directory} ({what}) is not writable: {_why_not(directory)}")]
        return []
    parent = directory.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [(key, f"cannot create {directory} ({what}): {parent} is not a directory")]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [
            (
                key,
                f"cannot create {directory} ({what}): {parent} is not writable: {_why_not(parent)}",
            )
        ]
    return []


def _why_not(path: Path) -> str:
    """A short reason why this user may not use path (read-only file system or permissions)."""
    try:
        info = os.stat(path)
        statvfs = os.statvfs(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    if statvfs.f_flag & os.ST_RDONLY:
        return "read-only file system"
    return (
        f"permission denied for uid {os.geteuid()} (mode {info.st_mode & 0o7777:04o}, "
        f"owner {info.st_uid}:{info.st_gid})"
    )
