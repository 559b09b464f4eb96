"""Load, validate and freeze the TOML configuration (or the embedded defaults).

Each setting is declared once, beside its field below (`setting(...)`, see bridge.settings),
and read by the one generic reader; what remains here are the checks across settings.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from bridge.matching import JobPattern, Rule
from bridge.settings import TableReader, declared, key_part, setting
from exporter.vocabulary import HYDRA_SOURCES, BackendKind, Source

CONFIG_ENV = "HYDRA_CACHIX_BRIDGE_CONFIG"
# Upper bounds beyond bridge.settings' defaults: beyond them a value is a mistake, not a wish.
MAX_WORKERS = 1024
MAX_JOBSET_LABELS = 100_000
MAX_EVENT_BYTES = 64 * 1024 * 1024


class LogLevel(StrEnum):
    """How much the daemon and the commands log."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one `file:key: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PushSettings:
    """How workers batch, time out and retry pushes."""

    workers: int = setting(4, minimum=1, maximum=MAX_WORKERS)
    batch_size: int = setting(32, minimum=1)
    timeout_seconds: float = setting(1800.0, minimum=1)
    max_attempts: int = setting(8, minimum=1)
    backoff_initial_seconds: float = setting(5.0, minimum=0)
    backoff_max_seconds: float = setting(900.0, minimum=0)
    shutdown_grace_seconds: float = setting(30.0, minimum=0)

    def check(self) -> Iterator[tuple[str, str]]:
        """Settings that contradict each other, as (key, message)."""
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            yield "backoff_max_seconds", "must not be below backoff_initial_seconds"


@dataclass(frozen=True)
class CacheConfig:
    """One destination binary cache and the backend that pushes to it."""

    name: str
    backend: BackendKind = field(metadata=declared(required="is required (one of {choices})"))
    uri: str | None = setting(None)
    # Relative secret and cachix paths stay relative: a bare name is a systemd credential.
    cachix_config: Path | None = setting(None)
    hostname: str | None = setting(None)
    auth_token_file: Path | None = setting(None)
    signing_key_file: Path | None = setting(None)
    extra_args: tuple[str, ...] = setting(())
    executable: str | None = setting(None)
    max_parallel: int | None = setting(None, minimum=1, maximum=MAX_WORKERS)


@dataclass(frozen=True)
class LogSource:
    """An append-only log file whose store paths are queued."""

    path: Path = field(metadata=declared(required="is required", resolve=True))
    resolve_derivations: bool = setting(False)


@dataclass(frozen=True)
class SpoolSettings:
    """Limits and timings of the spool watcher."""

    max_event_bytes: int = setting(1024 * 1024, minimum=256, maximum=MAX_EVENT_BYTES)
    rescan_seconds: float = setting(30.0, minimum=0.1)
    group_writable: bool = setting(False)
    # The root-only channel of the post-build-hook; None means <spool_dir>/hook.
    hook_dir: Path | None = setting(None, resolve=True)


@dataclass(frozen=True)
class MetricsSettings:
    """Where and how the Prometheus endpoint is served."""

    enabled: bool = setting(True)
    listen_address: str = setting("127.0.0.1")
    port: int = setting(10198, minimum=0, maximum=65535)
    tls_cert_file: Path | None = setting(None, resolve=True)
    tls_key_file: Path | None = setting(None, resolve=True)
    per_jobset: bool = setting(False)
    # Distinct (project, jobset) label pairs before the rest share project/jobset "(other)".
    per_jobset_limit: int = setting(200, minimum=1, maximum=MAX_JOBSET_LABELS)

    def check(self) -> Iterator[tuple[str, str]]:
        """Settings that contradict each other, as (key, message)."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            yield "tls_cert_file", "tls_cert_file and tls_key_file must be set together"


@dataclass(frozen=True)
class HydraDbSettings:
    """Hydra's PostgreSQL as a source: where it is and how far back catch-up looks."""

    dsn: str = field(
        metadata=declared(required='is required: a libpq connection string, e.g. "dbname=hydra"')
    )
    # Like auth_token_file: a relative name is a systemd credential (LoadCredential=).
    password_file: Path | None = setting(None)
    overlap_seconds: float = setting(3600.0, minimum=0)
    poll_seconds: float = setting(60.0, minimum=1)
    connect_timeout_seconds: float = setting(10.0, minimum=1)

    def check(self) -> Iterator[tuple[str, str]]:
        """Settings that are unusable as written, as (key, message)."""
        if self.dsn and self.dsn.strip() and any(ord(c) < 32 for c in self.dsn):
            yield "dsn", "must not contain control characters"


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    # Read as None when not set: parse_config puts in the defaults, which depend on each other.
    state_dir: Path = field(metadata=declared(resolve=True))
    spool_dir: Path = field(metadata=declared(resolve=True))
    caches: Mapping[str, CacheConfig]
    rules: tuple[Rule, ...]
    push: PushSettings = field(default_factory=PushSettings, metadata=declared())
    spool: SpoolSettings = field(default_factory=SpoolSettings, metadata=declared())
    metrics: MetricsSettings = field(default_factory=MetricsSettings, metadata=declared())
    log_sources: tuple[LogSource, ...] = setting(())
    log_poll_seconds: float = setting(1.0, minimum=0.05)
    retention_days: float = setting(14.0, minimum=0, maximum=36500)
    log_level: LogLevel = setting(LogLevel.INFO, invalid="must be one of {choices}")
    source_file: Path | None = None
    # `FILE:KEY: message` lines about settings that work but may not mean what was meant.
    warnings: tuple[str, ...] = ()
    hydra_db: HydraDbSettings | None = setting(None)

    @property
    def database_path(self) -> Path:
        """The SQLite queue file."""
        return self.state_dir / "queue.sqlite3"

    @property
    def hook_dir(self) -> Path:
        """Where the post-build-hook writes its events (only its own user may write there)."""
        return self.spool.hook_dir or self.spool_dir / "hook"


def default_state_dir() -> Path:
    """State directory of the embedded defaults: $XDG_STATE_HOME or ~/.local/state."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hydra-cachix-bridge"


def default_config(state_dir: Path | None = None) -> Config:
    """The embedded defaults: local state and one `nix-copy` cache in a local directory."""
    state = (state_dir or default_state_dir()).absolute()
    uri = f"file://{state / 'binary-cache'}"
    cache = CacheConfig(name="local", backend=BackendKind.NIX_COPY, uri=uri)
    return Config(
        state_dir=state,
        spool_dir=state / "spool",
        caches=MappingProxyType({"local": cache}),
        rules=(Rule(caches=("local",)),),
    )


# Nix signs only when copying to a binary-cache store; `secret-key` is a setting of those
# stores alone and every other store (ssh://, ssh-ng://, local, daemon, unix://, a path)
# ignores it without a word (NixOS/nix: `secret-key` is declared in BinaryCacheStoreConfig
# only, libstore's binary-cache-store.hh).
SIGNING_SCHEMES = ("file", "s3", "http", "https")


def store_scheme(uri: str) -> str:
    """The scheme of a Nix store URI (`local`, `daemon`, `auto` and paths have none: '')."""
    scheme, sep, _ = uri.partition("://")
    return scheme if sep else ""


def signs_paths(uri: str) -> bool:
    """True when `nix copy --to uri` honours `secret-key=` (a binary-cache store)."""
    return store_scheme(uri) in SIGNING_SCHEMES


# Store URI query keys whose value is itself a secret (`secret-key=` and `ssh-key=` name
# files, and are fine). A URI is on `nix copy`'s command line, in its error messages and
# in the logs; secrets must come another way.
_SECRET_QUERY_WORDS = ("secret", "password", "passwd", "token", "access-key", "access_key")
_PATH_QUERY_KEYS = ("secret-key", "ssh-key")


def uri_credentials(uri: str) -> str | None:
    """Why a store URI must not be used as it is (it carries a credential), or None."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # e.g. an unbalanced [ in the host: Nix will say what is wrong
        return None
    if password is not None:
        return (
            "holds a password (user:password@): it would be on nix's command line "
            "(/proc/PID/cmdline), in its errors, the logs and `status`. Use an SSH key "
            "(ssh://, ssh-ng://), a netrc file (nix.conf netrc-file=, http(s)://) or AWS "
            "credentials from the environment or a profile (s3://) instead"
        )
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        lowered = key.lower()
        if lowered in _PATH_QUERY_KEYS:
            continue
        if any(word in lowered for word in _SECRET_QUERY_WORDS):
            return (
                f"parameter {key[:64]!r} looks like a credential: it would be on nix's "
                "command line (/proc/PID/cmdline), in its errors, the logs and `status`. "
                "Give credentials to Nix another way (AWS credentials from the environment "
                "or a profile, a netrc file, an SSH key)"
            )
    return None


def _unsigned_store_message(uri: str) -> str:
    scheme = store_scheme(uri)
    kind = f"{scheme}://" if scheme else f"{uri.partition('?')[0]!r}"
    return (
        f"Nix signs only when copying to a binary-cache store (file://, s3://, http://, "
        f"https://); a {kind} store ignores the key and the paths arrive unsigned. Sign on "
        "the receiving side (or in Hydra) and remove this key"
    )


def _parse_cache(top: TableReader, name: str, table: Any) -> CacheConfig | None:
    key = f"caches.{key_part(name)}"
    if not isinstance(table, dict):
        top.problems.append(f"{top.file}:{key}: must be a table")
        return None
    if not name or "\0" in name:
        top.problems.append(f"{top.file}:{key}: a cache name must be non-empty text")
        return None
    r = top.sub(table, f"{key}.")
    cache = r.build(CacheConfig, name=name)
    nix_copy = cache.backend == BackendKind.NIX_COPY
    if nix_copy and not cache.uri:
        r.error("uri", "is required for backend nix-copy")
    if cache.backend == BackendKind.CACHIX and cache.uri is not None:
        r.error("uri", "is only for backend nix-copy (the cache name is the table name)")
    if nix_copy:
        for option in ("cachix_config", "hostname", "auth_token_file"):
            if option in table:
                r.error(option, "is only for backend cachix")
    problem = uri_credentials(cache.uri) if cache.uri else None
    if problem is not None:
        r.error("uri", problem)
    if nix_copy and cache.uri and not signs_paths(cache.uri):
        if cache.signing_key_file is not None:
            r.error("signing_key_file", _unsigned_store_message(cache.uri))
        elif "secret-key=" in cache.uri.partition("?")[2]:
            r.error("uri", "secret-key=: " + _unsigned_store_message(cache.uri))
    r.finish()
    return cache


def _parse_caches(top: TableReader) -> dict[str, CacheConfig]:
    caches: dict[str, CacheConfig] = {}
    for name, table in top.table_of("caches").items():
        cache = _parse_cache(top, name, table)
        if cache is not None:
            caches[name] = cache
    if not caches and not any(":caches" in problem for problem in top.problems):
        top.problems.append(f"{top.file}:caches: at least one [caches.NAME] table is required")
    return caches


def _parse_rule(r: TableReader, caches: Mapping[str, CacheConfig], warnings: list[str]) -> Rule:
    values = r.values(Rule)
    for name in values["caches"] or ():
        if name not in caches:
            r.error("caches", f"unknown cache {name!r} (defined: {', '.join(sorted(caches))})")
    patterns: list[JobPattern] = []
    for text in r.strings("jobs", ()):
        try:
            pattern = JobPattern.parse(text)
        except ValueError as exc:
            r.error("jobs", str(exc))
            continue
        patterns.append(pattern)
        for part in pattern.literal_stars():
            warnings.append(
                f"{r.file}:{r.key('jobs')}: warning: pattern {text!r}: {part!r} is matched "
                "literally, as Hydra does ('*' is a wildcard only as a whole part)"
            )
    if patterns and not set(values["sources"]) & HYDRA_SOURCES:
        r.error(
            "jobs",
            "job patterns only match Hydra events, but sources has none of "
            + ", ".join(s for s in Source if s in HYDRA_SOURCES),
        )
    r.finish()
    return Rule(**values, jobs=tuple(patterns))


def _parse_rules(
    top: TableReader, caches: Mapping[str, CacheConfig], warnings: list[str]
) -> tuple[Rule, ...]:
    tables = top.get("rules", list, None)
    if tables is None:  # one rule sending every source to every cache
        return (Rule(caches=tuple(caches)),) if caches else ()
    return tuple(_parse_rule(r, caches, warnings) for r in top.subtables("rules", tables))


def parse_config(data: dict[str, Any], file: str, base: Path | None = None) -> Config:
    """Validate a decoded TOML document into a Config, or raise ConfigError."""
    problems: list[str] = []
    warnings: list[str] = []
    base = base or Path.cwd()
    top = TableReader(file, data, "", problems, base)
    values = top.values(Config)
    state_dir = values.pop("state_dir") or (base / default_state_dir()).absolute()
    spool_dir = values.pop("spool_dir") or state_dir / "spool"
    caches = _parse_caches(top)
    rules = _parse_rules(top, caches, warnings)
    top.finish()
    if problems:
        raise ConfigError(problems)
    return Config(
        state_dir=state_dir,
        spool_dir=spool_dir,
        caches=MappingProxyType(caches),
        rules=rules,
        source_file=Path(file) if file != "<defaults>" else None,
        warnings=tuple(warnings),
        **values,
    )


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config from `path`, else $HYDRA_CACHIX_BRIDGE_CONFIG, else embedded defaults."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is None:
        return default_config()
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{file}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: invalid TOML: {exc}"]) from None
    return parse_config(data, str(file), base=file.parent.absolute())
