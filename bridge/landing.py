"""The landing page at /: a live summary in plain, escaped HTML (no JavaScript)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from bridge.describe import age
from bridge.quarantine import QuarantineSummary
from bridge.statedb import CacheStatus, DeadLetter
from exporter.vocabulary import ItemState

RUNBOOK = "https://github.com/hydra-cachix-bridge/hydra-cachix-bridge/blob/main/docs/alerts.md"
REFRESH_SECONDS = 30
_USERINFO = re.compile(r"(://[^/\s:@]*):[^@\s/]*@")


@dataclass(frozen=True)
class CacheState:
    """Whether a cache takes pushes, as far as the bridge knows."""

    up: bool
    since: float | None
    detail: str


@dataclass(frozen=True)
class LandingSnapshot:
    """Everything the page shows, read at request time."""

    statuses: Sequence[CacheStatus]
    dead: Sequence[DeadLetter]
    quarantine: QuarantineSummary | None
    log_sources: Sequence[tuple[str, bool]]
    problems: Sequence[str]
    config_file: str | None


def cache_state(status: CacheStatus) -> CacheState:
    """Up or down as the push workers keep it (cache_health): down while every push fails."""
    health = status.health
    if health is not None and not health.up:
        parts = [f"{health.failures} failed push(es) since"]
        if health.next_try_at is not None:
            parts.append(
                "next try at "
                + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(health.next_try_at))
            )
        if health.last_error:
            parts.append(f"last error: {redact_error(health.last_error)}")
        return CacheState(False, health.down_since, "; ".join(parts))
    if status.last_success_at is None and status.last_failure_at is None:
        return CacheState(True, None, "no push yet")
    return CacheState(True, status.last_success_at, "takes pushes")


def redact_error(text: str) -> str:
    """Hide passwords in URIs; secrets were already removed where the error was made."""
    return _USERINFO.sub(r"\1:***@", text)


def _when(now: float, then: float | None) -> str:
    if then is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(then))
    return f'<span title="{escape(stamp)}">{escape(age(now, then))}</span>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.n{text-align:right}
.up{color:#176317;font-weight:bold}.down{color:#a31515;font-weight:bold}
code{background:#f3f3f3;padding:0 .2em}
.err{font-family:monospace;white-space:pre-wrap;color:#a31515}
"""


def render_landing(snapshot: LandingSnapshot, version: str, now: float) -> str:
    """The whole page; every value from the queue, the spool or the config is escaped."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        f"<title>hydra-cachix-bridge {escape(version)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>hydra-cachix-bridge {escape(version)}</h1>",
        '<p><a href="/metrics">Metrics</a> · <a href="/healthz">Health</a> · '
        f'<a href="{RUNBOOK}">Alert runbook</a> · '
        f"page generated {escape(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now)))}, "
        f"reloads every {REFRESH_SECONDS}s</p>",
    ]
    if snapshot.problems:
        parts.append("<h2>Health: problems</h2><ul>")
        parts += [f"<li>{escape(p)}</li>" for p in snapshot.problems]
        parts.append("</ul>")
    else:
        parts.append('<p>Health: <span class="up">healthy</span></p>')
    parts += _caches(snapshot, now)
    parts += _dead_letters(snapshot, now)
    parts += _quarantine(snapshot.quarantine, now)
    parts += _log_sources(snapshot.log_sources)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _caches(snapshot: LandingSnapshot, now: float) -> list[str]:
    head = "".join(
        f"<th>{escape(h)}</th>"
        for h in (
            "cache",
            "state",
            *(s if s != ItemState.INFLIGHT else "in flight" for s in ItemState),
            "oldest pending",
            "last success",
            "last failure",
        )
    )
    rows = ["<h2>Caches</h2>", f"<table><tr>{head}</tr>"]
    errors: list[str] = []
    for status in snapshot.statuses:
        state = cache_state(status)
        label = "up" if state.up else "down"
        css = label
        since = f" since {_when(now, state.since)}" if state.since is not None else ""
        counts = "".join(f'<td class="n">{status.counts.get(s, 0)}</td>' for s in ItemState)
        oldest = (
            "-"
            if status.oldest_pending_at is None
            else escape(age(now, status.oldest_pending_at).removesuffix(" ago"))
        )
        rows.append(
            f"<tr><td>{escape(status.cache)}</td>"
            f'<td><span class="{css}">{label}</span>{since}<br><small>'
            f"{escape(state.detail)}</small></td>{counts}<td>{oldest}</td>"
            f"<td>{_when(now, status.last_success_at)}</td>"
            f"<td>{_when(now, status.last_failure_at)}</td></tr>"
        )
        if status.last_error:
            errors.append(
                f"<li>{escape(status.cache)} ({_when(now, status.last_failure_at)}): "
                f'<span class="err">{escape(redact_error(status.last_error))}</span></li>'
            )
    rows.append("</table>")
    if errors:
        rows += ["<p>Last error per cache:</p><ul>", *errors, "</ul>"]
    return rows


def _command(snapshot: LandingSnapshot, args: str) -> str:
    config = f" --config {snapshot.config_file}" if snapshot.config_file else ""
    return f"<code>hydra-cachix-bridge retry{escape(config)} {escape(args)}</code>"


def _dead_letters(snapshot: LandingSnapshot, now: float) -> list[str]:
    total = sum(s.counts.get(ItemState.DEAD, 0) for s in snapshot.statuses)
    if not total:
        return ["<h2>Dead letters</h2>", "<p>None.</p>"]
    rows = [
        "<h2>Dead letters</h2>",
        f"<p>{total} path(s) exhausted their attempts and wait for you. Fix the cause, then "
        f"run {_command(snapshot, '--all')}, or {_command(snapshot, 'ID')} for one.",
        f" The {len(snapshot.dead)} most recent:</p>",
        "<table><tr><th>ID</th><th>cache</th><th>path</th><th>attempts</th><th>dead since</th>"
        "<th>error</th></tr>",
    ]
    for d in snapshot.dead:
        error = redact_error(f"{d.reason}: {d.error}" if d.reason else (d.error or ""))
        rows.append(
            f'<tr><td class="n">{d.id}</td><td>{escape(d.cache)}</td><td>{escape(d.path)}</td>'
            f'<td class="n">{d.attempts}</td><td>{_when(now, d.updated_at)}</td>'
            f'<td class="err">{escape(error)}</td></tr>'
        )
    rows.append("</table>")
    return rows


def _quarantine(summary: QuarantineSummary | None, now: float) -> list[str]:
    rows = ["<h2>Quarantined event files</h2>"]
    if summary is None:
        return [*rows, "<p>Not known.</p>"]
    where = f"<code>{escape(str(summary.directory))}</code>"
    if summary.error is not None:
        return [*rows, f"<p>{where}: {escape(summary.error)}</p>"]
    if not summary.count:
        return [*rows, f"<p>None in {where}.</p>"]
    rows += [
        f"<p>{summary.count} rejected event file(s) in {where}, each with a "
        "<code>.reason</code> file; their paths were not queued. Newest:</p>",
        "<table><tr><th>file</th><th>when</th><th>reason</th><th>message</th></tr>",
    ]
    for q in summary.newest:
        rows.append(
            f"<tr><td>{escape(q.quarantined_as)}</td><td>{_when(now, q.quarantined_at)}</td>"
            f"<td>{escape(q.reason)}</td><td>{escape(q.message)}</td></tr>"
        )
    rows.append("</table>")
    return rows


def _log_sources(sources: Sequence[tuple[str, bool]]) -> list[str]:
    if not sources:
        return []
    rows = ["<h2>Log sources</h2>", "<ul>"]
    for path, readable in sources:
        state = (
            '<span class="up">readable</span>'
            if readable
            else ('<span class="down">not readable</span>')
        )
        rows.append(f"<li><code>{escape(path)}</code>: {state}</li>")
    rows.append("</ul>")
    return rows
