"""Load, validate and freeze the TOML configuration (or the embedded defaults)."""

from __future__ import annotations

import datetime
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from exporter.vocabulary import HYDRA_SOURCES, Source

CONFIG_ENV = "HYDRA_CACHIX_BRIDGE_CONFIG"
BACKENDS = ("cachix", "nix-copy")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one `file:key: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class JobPattern:
    """Hydra's `project:jobset:job` pattern: each part is `*` or must equal the value.

    Parsed exactly as Hydra's RunCommand plugin does (NixOS/hydra,
    subprojects/hydra/lib/Hydra/Plugin/RunCommand.pm, `configSectionMatches`): the text is
    split with Perl's `split /:/`, which drops trailing empty fields; more than three fields
    is an error; a missing field is `*`. So `""`, `proj:`, `proj::` and `proj:main:simple:`
    are all valid, while an empty field before a non-empty one (`proj::simple`) must equal
    the empty string. `*` is a wildcard only as a whole part: `release-*` is literal.
    """

    project: str
    jobset: str
    job: str

    @classmethod
    def parse(cls, text: str) -> JobPattern:
        """Parse a pattern as Hydra does; more than three parts is a ValueError."""
        parts = text.split(":")
        while parts and not parts[-1]:  # Perl's split drops trailing empty fields
            parts.pop()
        if len(parts) > 3:
            raise ValueError(
                f"invalid job pattern {text!r}: Hydra allows at most three ':'-separated "
                "parts (project:jobset:job)"
            )
        parts += ["*"] * (3 - len(parts))
        return cls(*parts)

    def matches(self, project: str, jobset: str, job: str) -> bool:
        """True when every part is `*` or equal to the value."""
        return all(
            want == "*" or want == got
            for want, got in ((self.project, project), (self.jobset, jobset), (self.job, job))
        )

    def literal_stars(self) -> tuple[str, ...]:
        """Parts that contain `*` without being `*`: Hydra matches them literally."""
        return tuple(p for p in (self.project, self.jobset, self.job) if "*" in p and p != "*")

    def __str__(self) -> str:
        return f"{self.project}:{self.jobset}:{self.job}"


@dataclass(frozen=True)
class PushSettings:
    """How workers batch, time out and retry pushes."""

    workers: int = 4
    batch_size: int = 32
    timeout_seconds: float = 1800.0
    max_attempts: int = 8
    backoff_initial_seconds: float = 5.0
    backoff_max_seconds: float = 900.0
    shutdown_grace_seconds: float = 30.0


@dataclass(frozen=True)
class CacheConfig:
    """One destination binary cache and the backend that pushes to it."""

    name: str
    backend: str
    uri: str | None = None
    cachix_config: Path | None = None
    hostname: str | None = None
    auth_token_file: Path | None = None
    signing_key_file: Path | None = None
    extra_args: tuple[str, ...] = ()
    executable: str | None = None
    max_parallel: int | None = None


@dataclass(frozen=True)
class Rule:
    """Which events (by source, job and status) and which paths go to which caches."""

    caches: tuple[str, ...]
    jobs: tuple[JobPattern, ...] = ()
    sources: tuple[str, ...] = tuple(Source)
    build_statuses: tuple[int, ...] = (0,)
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogSource:
    """An append-only log file whose store paths are queued."""

    path: Path
    resolve_derivations: bool = False


@dataclass(frozen=True)
class SpoolSettings:
    """Limits and timings of the spool watcher."""

    max_event_bytes: int = 1024 * 1024
    rescan_seconds: float = 30.0
    group_writable: bool = False
    # The root-only channel of the post-build-hook; None means <spool_dir>/hook.
    hook_dir: Path | None = None


@dataclass(frozen=True)
class MetricsSettings:
    """Where and how the Prometheus endpoint is served."""

    enabled: bool = True
    listen_address: str = "127.0.0.1"
    port: int = 10198
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    per_jobset: bool = False
    # Distinct (project, jobset) label pairs before the rest share project/jobset "(other)".
    per_jobset_limit: int = 200


@dataclass(frozen=True)
class HydraDbSettings:
    """Hydra's PostgreSQL as a source: where it is and how far back catch-up looks."""

    dsn: str
    password_file: Path | None = None
    overlap_seconds: float = 3600.0
    poll_seconds: float = 60.0
    connect_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    state_dir: Path
    spool_dir: Path
    caches: Mapping[str, CacheConfig]
    rules: tuple[Rule, ...]
    push: PushSettings = field(default_factory=PushSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log_sources: tuple[LogSource, ...] = ()
    log_poll_seconds: float = 1.0
    retention_days: float = 14.0
    log_level: str = "info"
    source_file: Path | None = None
    # `FILE:KEY: message` lines about settings that work but may not mean what was meant.
    warnings: tuple[str, ...] = ()
    hydra_db: HydraDbSettings | None = None

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
    cache = CacheConfig(name="local", backend="nix-copy", uri=f"file://{state / 'binary-cache'}")
    return Config(
        state_dir=state,
        spool_dir=state / "spool",
        caches=MappingProxyType({"local": cache}),
        rules=(Rule(caches=("local",)),),
    )


# Upper bounds that keep every setting usable downstream (thread counts, timers, buffers):
# beyond them a value is a mistake, not a wish.
MAX_SECONDS = 365 * 86400.0
MAX_INTEGER = 2**31 - 1
MAX_WORKERS = 1024
MAX_JOBSET_LABELS = 100_000
MAX_EVENT_BYTES = 64 * 1024 * 1024
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_part(name: str) -> str:
    """A TOML key as it is written in a file: bare when it can be, else quoted and escaped."""
    if _BARE_KEY.fullmatch(name):
        return name
    escaped = "".join(
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else "\\" + c if c in '"\\' else c
        for c in name
    )
    return f'"{escaped}"'


class _Reader:
    """Typed access to one TOML table that records problems instead of raising."""

    def __init__(self, file: str, table: dict[str, Any], prefix: str, problems: list[str]) -> None:
        self.file, self.table, self.prefix, self.problems = file, table, prefix, problems
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{key_part(name)}"

    def error(self, name: str, message: str) -> None:
        self.problems.append(f"{self.file}:{self.key(name)}: {message}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = False if isinstance(value, bool) and bool not in kinds else isinstance(value, kinds)
        if not ok:
            names = " or ".join(_type_name(k) for k in kinds)
            self.error(name, f"must be {names}, got {_type_name(type(value))}")
            return default
        if isinstance(value, str) and "\0" in value:
            self.error(name, "must not contain a NUL character")
            return default
        return value

    def number(
        self,
        name: str,
        default: float,
        minimum: float,
        integer: bool = False,
        maximum: float | None = None,
    ) -> Any:
        value = self.get(name, int if integer else (int, float), default)
        if maximum is None:
            maximum = MAX_INTEGER if integer else MAX_SECONDS
        if isinstance(value, float) and not math.isfinite(value):
            self.error(name, "must be a finite number")
            return default
        if value < minimum:
            self.error(name, f"must be at least {minimum:g}")
            return default
        if value > maximum:
            self.error(name, f"must be at most {maximum:g}")
            return default
        return value if integer else float(value)

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, None)
        if value is None:
            return default
        if not all(isinstance(v, str) for v in value):
            self.error(name, "must be a list of strings")
            return default
        if any("\0" in v for v in value):
            self.error(name, "must not contain a NUL character")
            return default
        return tuple(value)

    def path(self, name: str) -> Path | None:
        value = self.get(name, str, None)
        if value is None:
            return None
        if not value:
            self.error(name, "must not be empty")
            return None
        return Path(value)

    def table_of(self, name: str) -> dict[str, Any]:
        value = self.get(name, dict, {})
        return value if isinstance(value, dict) else {}

    def finish(self) -> None:
        for name in sorted(set(self.table) - self.seen):
            self.error(name, "unknown key")


def _under(base: Path, path: Path | None) -> Path | None:
    return None if path is None else (base / path).absolute()


def _type_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
        datetime.datetime: "a date-time",
        datetime.date: "a date",
        datetime.time: "a time",
    }.get(kind, kind.__name__)


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


def _parse_cache(file: str, name: str, table: Any, problems: list[str]) -> CacheConfig | None:
    if not isinstance(table, dict):
        problems.append(f"{file}:caches.{key_part(name)}: must be a table")
        return None
    if not name or "\0" in name:
        problems.append(f"{file}:caches.{key_part(name)}: a cache name must be non-empty text")
        return None
    r = _Reader(file, table, f"caches.{key_part(name)}.", problems)
    backend = r.get("backend", str, None)
    if backend is None:
        r.error("backend", f"is required (one of {', '.join(BACKENDS)})")
    elif backend not in BACKENDS:
        r.error("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    cache = CacheConfig(
        name=name,
        backend=backend or "",
        uri=r.get("uri", str, None),
        cachix_config=r.path("cachix_config"),
        hostname=r.get("hostname", str, None),
        auth_token_file=r.path("auth_token_file"),
        signing_key_file=r.path("signing_key_file"),
        extra_args=r.strings("extra_args", ()),
        executable=r.get("executable", str, None),
        max_parallel=r.get("max_parallel", int, None),
    )
    if backend == "nix-copy" and not cache.uri:
        r.error("uri", "is required for backend nix-copy")
    if backend == "cachix" and cache.uri is not None:
        r.error("uri", "is only for backend nix-copy (the cache name is the table name)")
    if backend == "nix-copy":
        for key in ("cachix_config", "hostname", "auth_token_file"):
            if key in table:
                r.error(key, "is only for backend cachix")
    problem = uri_credentials(cache.uri) if cache.uri else None
    if problem is not None:
        r.error("uri", problem)
    if backend == "nix-copy" and cache.uri and not signs_paths(cache.uri):
        if cache.signing_key_file is not None:
            r.error("signing_key_file", _unsigned_store_message(cache.uri))
        elif "secret-key=" in cache.uri.partition("?")[2]:
            r.error("uri", "secret-key=: " + _unsigned_store_message(cache.uri))
    if cache.max_parallel is not None and cache.max_parallel < 1:
        r.error("max_parallel", "must be at least 1")
    if cache.max_parallel is not None and cache.max_parallel > MAX_WORKERS:
        r.error("max_parallel", f"must be at most {MAX_WORKERS}")
    r.finish()
    return cache


def _parse_rule(
    file: str,
    index: int,
    table: Any,
    caches: dict[str, CacheConfig],
    problems: list[str],
    warnings: list[str],
) -> Rule | None:
    prefix = f"rules[{index}]."
    if not isinstance(table, dict):
        problems.append(f"{file}:rules[{index}]: must be a table")
        return None
    r = _Reader(file, table, prefix, problems)
    names = r.strings("caches", ())
    if not names:
        r.error("caches", "is required: a non-empty list of cache names")
    for name in names:
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
                f"{file}:{r.key('jobs')}: warning: pattern {text!r}: {part!r} is matched "
                "literally, as Hydra does ('*' is a wildcard only as a whole part)"
            )
    sources = r.strings("sources", tuple(Source))
    for source in sources:
        if source not in set(Source):
            r.error("sources", f"unknown source {source!r} (one of {', '.join(Source)})")
    if patterns and not set(sources) & set(HYDRA_SOURCES):
        r.error(
            "jobs",
            "job patterns only match Hydra events, but sources has none of "
            + ", ".join(s for s in Source if s in HYDRA_SOURCES),
        )
    statuses = r.get("build_statuses", list, [0])
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 99 for s in statuses):
        r.error("build_statuses", "must be a list of Hydra build status integers")
        statuses = [0]
    rule = Rule(
        caches=names,
        jobs=tuple(patterns),
        sources=sources,
        build_statuses=tuple(statuses),
        exclude=r.strings("exclude", ()),
    )
    r.finish()
    return rule


def _parse_hydra_db(file: str, top: _Reader, problems: list[str]) -> HydraDbSettings | None:
    if "hydra_db" not in top.table:
        top.seen.add("hydra_db")
        return None
    h = _Reader(file, top.table_of("hydra_db"), "hydra_db.", problems)
    d = HydraDbSettings(dsn="")
    dsn = h.get("dsn", str, "")
    if not dsn.strip():
        h.error("dsn", 'is required: a libpq connection string, e.g. "dbname=hydra"')
    elif any(ord(c) < 32 for c in dsn):
        h.error("dsn", "must not contain control characters")
    settings = HydraDbSettings(
        dsn=dsn,
        # Like auth_token_file: a relative name is a systemd credential (LoadCredential=).
        password_file=h.path("password_file"),
        overlap_seconds=h.number("overlap_seconds", d.overlap_seconds, 0),
        poll_seconds=h.number("poll_seconds", d.poll_seconds, 1),
        connect_timeout_seconds=h.number("connect_timeout_seconds", d.connect_timeout_seconds, 1),
    )
    h.finish()
    return settings


def parse_config(data: dict[str, Any], file: str, base: Path | None = None) -> Config:
    """Validate a decoded TOML document into a Config, or raise ConfigError."""
    problems: list[str] = []
    warnings: list[str] = []
    top = _Reader(file, data, "", problems)
    base = base or Path.cwd()
    state_dir = top.path("state_dir") or default_state_dir()
    state_dir = (base / state_dir).absolute()
    spool_dir = top.path("spool_dir")
    spool_dir = (base / spool_dir).absolute() if spool_dir else state_dir / "spool"
    log_level = top.get("log_level", str, "info")
    if log_level not in LOG_LEVELS:
        top.error("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        log_level = "info"
    retention = top.number("retention_days", 14.0, 0.0, maximum=36500)

    p = _Reader(file, top.table_of("push"), "push.", problems)
    d = PushSettings()
    push = PushSettings(
        workers=p.number("workers", d.workers, 1, integer=True, maximum=MAX_WORKERS),
        batch_size=p.number("batch_size", d.batch_size, 1, integer=True),
        timeout_seconds=p.number("timeout_seconds", d.timeout_seconds, 1),
        max_attempts=p.number("max_attempts", d.max_attempts, 1, integer=True),
        backoff_initial_seconds=p.number("backoff_initial_seconds", d.backoff_initial_seconds, 0),
        backoff_max_seconds=p.number("backoff_max_seconds", d.backoff_max_seconds, 0),
        shutdown_grace_seconds=p.number("shutdown_grace_seconds", d.shutdown_grace_seconds, 0),
    )
    if push.backoff_max_seconds < push.backoff_initial_seconds:
        p.error("backoff_max_seconds", "must not be below backoff_initial_seconds")
    p.finish()

    s = _Reader(file, top.table_of("spool"), "spool.", problems)
    ds = SpoolSettings()
    spool = SpoolSettings(
        max_event_bytes=s.number(
            "max_event_bytes", ds.max_event_bytes, 256, integer=True, maximum=MAX_EVENT_BYTES
        ),
        rescan_seconds=s.number("rescan_seconds", ds.rescan_seconds, 0.1),
        group_writable=s.get("group_writable", bool, ds.group_writable),
        hook_dir=_under(base, s.path("hook_dir")),
    )
    s.finish()

    m = _Reader(file, top.table_of("metrics"), "metrics.", problems)
    dm = MetricsSettings()
    port = m.number("port", dm.port, 0, integer=True, maximum=65535)
    metrics = MetricsSettings(
        enabled=m.get("enabled", bool, dm.enabled),
        listen_address=m.get("listen_address", str, dm.listen_address),
        port=port,
        tls_cert_file=_under(base, m.path("tls_cert_file")),
        tls_key_file=_under(base, m.path("tls_key_file")),
        per_jobset=m.get("per_jobset", bool, dm.per_jobset),
        per_jobset_limit=m.number(
            "per_jobset_limit", dm.per_jobset_limit, 1, integer=True, maximum=MAX_JOBSET_LABELS
        ),
    )
    if (metrics.tls_cert_file is None) != (metrics.tls_key_file is None):
        m.error("tls_cert_file", "tls_cert_file and tls_key_file must be set together")
    m.finish()

    caches: dict[str, CacheConfig] = {}
    for name, table in top.table_of("caches").items():
        cache = _parse_cache(file, name, table, problems)
        if cache is not None:
            caches[name] = cache
    if not caches and not any(":caches" in problem for problem in problems):
        problems.append(f"{file}:caches: at least one [caches.NAME] table is required")

    raw_rules = top.get("rules", list, None)
    rules: list[Rule] = []
    if raw_rules is None:
        rules = [Rule(caches=tuple(caches))] if caches else []
    for index, table in enumerate(raw_rules or []):
        rule = _parse_rule(file, index, table, caches, problems, warnings)
        if rule is not None:
            rules.append(rule)

    log_sources: list[LogSource] = []
    for index, table in enumerate(top.get("log_sources", list, [])):
        if not isinstance(table, dict):
            problems.append(f"{file}:log_sources[{index}]: must be a table")
            continue
        lr = _Reader(file, table, f"log_sources[{index}].", problems)
        path = lr.path("path")
        if path is None:
            lr.error("path", "is required")
        else:
            resolve = lr.get("resolve_derivations", bool, False)
            log_sources.append(LogSource((base / path).absolute(), resolve))
        lr.finish()
    log_poll = top.number("log_poll_seconds", 1.0, 0.05)
    hydra_db = _parse_hydra_db(file, top, problems)
    top.finish()
    if problems:
        raise ConfigError(problems)
    return Config(
        state_dir=state_dir,
        spool_dir=spool_dir,
        caches=MappingProxyType(caches),
        rules=tuple(rules),
        push=push,
        spool=spool,
        metrics=metrics,
        log_sources=tuple(log_sources),
        log_poll_seconds=log_poll,
        retention_days=retention,
        log_level=log_level,
        source_file=Path(file) if file != "<defaults>" else None,
        warnings=tuple(warnings),
        hydra_db=hydra_db,
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
