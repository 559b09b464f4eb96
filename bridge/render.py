"""Human and JSON renderings of the effective config and of the queue status."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from bridge.cachehealth import format_time
from bridge.config import Config
from bridge.describe import age
from bridge.hydrastate import SourceStatus
from bridge.logsetup import printable
from bridge.quarantine import QuarantineSummary
from bridge.secrets import SecretError, read_secret
from bridge.statedb import CacheHealth, CacheStatus, DeadLetter
from exporter.vocabulary import ItemState

if TYPE_CHECKING:
    from bridge.backfill import BackfillReport, Selection


def mask_uri(uri: str) -> str:
    """Hide a password in a URI's user info."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def mask_conninfo(dsn: str) -> str:
    """Hide a password in a libpq conninfo string (key=value or postgresql:// URI)."""
    if "://" in dsn:
        dsn = mask_uri(dsn)
    return _CONNINFO_PASSWORD.sub(r"\1***", dsn)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(text: str) -> str:
    """A TOML basic string: escape quote, backslash and control characters only."""
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def _secret_note(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        read_secret(path)
    except SecretError as exc:
        return f"  # NOT READABLE: {exc}"
    return "  # readable; content not shown"


def render_config(config: Config) -> str:
    """The effective config as TOML, with secrets never read into the output."""
    lines = [
        f"# effective configuration ({config.source_file or 'embedded defaults'})",
        f"state_dir = {_toml_value(config.state_dir)}",
        f"spool_dir = {_toml_value(config.spool_dir)}",
        f"log_level = {_toml_value(config.log_level)}",
        f"retention_days = {_toml_value(config.retention_days)}",
        f"log_poll_seconds = {_toml_value(config.log_poll_seconds)}",
        "",
        "[push]",
    ]
    for key, value in vars(config.push).items():
        lines.append(f"{key} = {_toml_value(value)}")
    lines += ["", "[spool]"]
    for key, value in vars(config.spool).items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    lines += ["", "[metrics]"]
    for key, value in vars(config.metrics).items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, cache in config.caches.items():
        lines += ["", f"[caches.{_toml_key(name)}]"]
        for key, value in vars(cache).items():
            if key == "name" or value is None or value == ():
                continue
            if key == "uri":
                value = mask_uri(str(value))
            secret_file = key in ("auth_token_file", "signing_key_file", "cachix_config")
            note = _secret_note(value) if secret_file else ""
            lines.append(f"{key} = {_toml_value(value)}{note}")
    for rule in config.rules:
        lines += ["", "[[rules]]", f"caches = {_toml_value(rule.caches)}"]
        if rule.jobs:
            lines.append(f"jobs = {_toml_value([str(j) for j in rule.jobs])}")
        lines.append(f"sources = {_toml_value(rule.sources)}")
        lines.append(f"build_statuses = {_toml_value(rule.build_statuses)}")
        if rule.exclude:
            lines.append(f"exclude = {_toml_value(rule.exclude)}")
    for source in config.log_sources:
        lines += [
            "",
            "[[log_sources]]",
            f"path = {_toml_value(source.path)}",
            f"resolve_derivations = {_toml_value(source.resolve_derivations)}",
        ]
    if config.hydra_db is not None:
        lines += ["", "[hydra_db]"]
        for key, value in vars(config.hydra_db).items():
            if value is None:
                continue
            if key == "dsn":
                value = mask_conninfo(str(value))
            note = _secret_note(value) if key == "password_file" else ""
            lines.append(f"{key} = {_toml_value(value)}{note}")
    return "\n".join(lines) + "\n"


def _health(status: CacheStatus) -> CacheHealth:
    return status.health if status.health is not None else CacheHealth(status.cache)


def _in(now: float, then: float) -> str:
    seconds = int(then - now)
    return "due now" if seconds <= 0 else f"in {age(then, now).removesuffix(' ago')}"


def health_line(status: CacheStatus, now: float) -> str:
    """One line on whether a cache takes pushes: up, or down since when and why."""
    health = _health(status)
    if health.up:
        return f"{status.cache}: up"
    since = health.down_since or now
    retry = health.next_try_at or now
    return (
        f"{status.cache}: DOWN since {format_time(since)} ({age(now, since)}), "
        f"next try at {format_time(retry)} ({_in(now, retry)}), "
        f"{health.failures} failed push(es), last error: {printable(health.last_error or '-')}"
    )


def status_document(
    statuses: Sequence[CacheStatus],
    dead: Sequence[DeadLetter],
    now: float,
    daemon_running: bool,
    *,
    quarantine: QuarantineSummary | None = None,
) -> dict[str, Any]:
    """The status as a JSON-ready document."""
    document = {
        "daemon_running": daemon_running,
        "time": now,
        "caches": [
            {
                "cache": s.cache,
                "counts": s.counts,
                "oldest_pending_age_seconds": (
                    None if s.oldest_pending_at is None else max(0.0, now - s.oldest_pending_at)
                ),
                "last_success_at": s.last_success_at,
                "last_failure_at": s.last_failure_at,
                "last_error": s.last_error,
                "state": "up" if _health(s).up else "down",
                "down_since": _health(s).down_since,
                "next_try_at": _health(s).next_try_at,
                "failed_pushes_while_down": _health(s).failures,
                "down_error": _health(s).last_error,
            }
            for s in statuses
        ],
        "dead_letters": [
            {
                "id": d.id,
                "cache": d.cache,
                "path": d.path,
                "attempts": d.attempts,
                "dead_at": d.updated_at,
                "reason": d.reason,
                "error": d.error,
            }
            for d in dead
        ],
    }
    if quarantine is not None:
        document["quarantine"] = {
            "directory": str(quarantine.directory),
            "count": quarantine.count,
            "error": quarantine.error,
            "newest": [
                {
                    "file": q.file,
                    "quarantined_as": q.quarantined_as,
                    "reason": q.reason,
                    "message": q.message,
                    "quarantined_at": q.quarantined_at,
                }
                for q in quarantine.newest
            ],
        }
    return document


def render_status(
    statuses: Sequence[CacheStatus],
    dead: Sequence[DeadLetter],
    now: float,
    daemon_running: bool,
    *,
    quarantine: QuarantineSummary | None = None,
) -> str:
    """The status as a table for people."""
    lines = [f"daemon: {'running' if daemon_running else 'not running'}", ""]
    header = (
        "cache",
        *(state if state != ItemState.INFLIGHT else "in flight" for state in ItemState),
        "oldest pending",
        "last success",
        "last failure",
    )
    rows = [header]
    for s in statuses:
        c = s.counts
        rows.append(
            (
                s.cache,
                *(str(c[state]) for state in ItemState),
                "-"
                if s.oldest_pending_at is None
                else age(now, s.oldest_pending_at).removesuffix(" ago"),
                age(now, s.last_success_at),
                age(now, s.last_failure_at),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    lines += ["", "caches:"]
    lines += [f"  {health_line(s, now)}" for s in statuses]
    for s in statuses:
        if not _health(s).up:
            continue
        if s.last_error and (s.last_failure_at or 0) >= (s.last_success_at or 0):
            lines.append(f"last error for {s.cache}: {printable(s.last_error)}")
    if dead:
        lines += [
            "",
            "most recent dead letters (retry with `hydra-cachix-bridge retry ID` or `--all`):",
        ]
        for d in dead:
            lines.append(
                f"  #{d.id} {d.cache} {printable(d.path)} ({d.attempts} attempts, "
                f"{age(now, d.updated_at)}): {printable(d.reason or '-')}: "
                f"{printable(d.error or '-')}"
            )
    if quarantine is not None:
        lines += _render_quarantine(quarantine, now)
    return "\n".join(lines) + "\n"


def _render_quarantine(quarantine: QuarantineSummary, now: float) -> list[str]:
    if quarantine.error is not None:
        return ["", f"quarantine {quarantine.directory}: {quarantine.error}"]
    if not quarantine.count:
        return ["", f"quarantine: empty ({quarantine.directory})"]
    lines = [
        "",
        f"quarantine: {quarantine.count} rejected event file(s) in {quarantine.directory}"
        " (each with a .reason file; delete them once handled); newest:",
    ]
    for q in quarantine.newest:
        lines.append(
            f"  {printable(q.quarantined_as)} ({age(now, q.quarantined_at)}): "
            f"{q.reason}: {printable(q.message)}"
        )
    return lines


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def hydra_db_document(status: SourceStatus | None, now: float) -> dict[str, Any] | None:
    """The Hydra database source's state for `status --json` (None when not configured)."""
    if status is None:
        return {"state": "never ran", "checkpoint_stoptime": None}
    return {
        "state": status.state,
        "state_since": status.state_since,
        "last_error": status.last_error,
        "checkpoint_stoptime": status.checkpoint_stoptime,
        "checkpoint_build_id": status.checkpoint_build_id,
        "newest_stoptime": status.newest_stoptime,
        "lag_seconds": (
            None if status.newest_stoptime is None else max(0.0, now - status.newest_stoptime)
        ),
    }


def render_hydra_db(status: SourceStatus | None, now: float, daemon_running: bool) -> str:
    """The Hydra database source's state, for people."""
    if status is None:
        return "hydra database source: configured, never ran with this queue database\n"
    state = status.state if daemon_running else f"not running (last: {status.state})"
    lines = [
        f"hydra database source: {state} since {age(now, status.state_since)}",
        f"  checkpoint: builds finished up to {_when(status.checkpoint_stoptime)}"
        + (f" (build {status.checkpoint_build_id})" if status.checkpoint_build_id else ""),
        f"  newest build recorded: finished {_when(status.newest_stoptime)}",
    ]
    if status.last_error and status.state != "listening":
        lines.append(f"  last error: {status.last_error}")
    return "\n".join(lines) + "\n"


def render_backfill(report: BackfillReport, selection: Selection, dry_run: bool, now: float) -> str:
    """What `backfill` did, or with --dry-run would do, per cache."""
    what = f"{selection.project}:{selection.jobset}"
    if report.eval_id is not None:
        what += f" evaluation {report.eval_id}"
    if selection.since is not None:
        what += f" finished since {_when(selection.since)}"
    verb = "would record" if dry_run else "recorded"
    new = report.builds - report.skipped - report.rejected
    lines = [
        f"{what}: {report.builds} finished build(s); {verb} {new} as events (source backfill)",
    ]
    if report.skipped:
        lines.append(f"  {report.skipped} skipped (recorded by an earlier backfill, or cancelled)")
    if report.rejected:
        lines.append(f"  {report.rejected} rejected as invalid rows (see the warnings above)")
    for reason, count in sorted(report.ignored.items()):
        lines.append(f"  {count} match no cache: {reason}")
    caches = sorted(set(report.cache_builds) | set(report.cache_paths))
    if caches:
        head = "cache would get" if dry_run else "cache gets"
        lines.append(f"{head} (paths already queued or pushed are not queued again):")
        for cache in caches:
            lines.append(
                f"  {cache}: {report.cache_builds.get(cache, 0)} build(s), "
                f"{report.cache_paths.get(cache, 0)} path(s)"
            )
    elif new:
        lines.append("no cache gets any path (no rule matches these builds)")
    return "\n".join(lines) + "\n"
