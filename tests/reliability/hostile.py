"""Shared by the hostile-input tests (test_hostile_*.py): settings, the shell-injection
canary, the per-module JSON report, the store-path oracle, and the in-process harness (a real
spool, SQLite `StateDb`, metrics and `Ingestor`) with its property checks.

The properties, for every input:
  * nothing but `EventRejected` comes out of validation, and nothing at all out of ingest;
  * the input is either accepted as an event whose every path is a valid store path (checked
    against an independent copy of the syntax in REFERENCE.md §4, and present verbatim in the
    input), or quarantined with a reason from RejectReason and a `.reason` file;
  * nothing is left in incoming/ (for candidate names);
  * the hook exits 0;
  * no input reaches a shell: a canary file that `$(touch …)`, backticks, `;`, `|`, `&&`
    and `>` in the inputs would create is never created, and the backends hand the exact
    path strings to an argv-recording executable as separate stdin lines / arguments.

The property tests run every generated case and collect violations by kind (with the smallest
input seen for each) instead of stopping at the first one, so one bug does not hide another
and the case counts are real; the test then fails listing every kind of violation.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from prometheus_client import CollectorRegistry

from bridge.backends import CachixBackend, NixCopyBackend
from bridge.clock import SystemClock
from bridge.config import CacheConfig, Config, SpoolSettings
from bridge.events import (
    hook_envelope,
    hydra_envelope,
)
from bridge.ingest import Ingestor
from bridge.intake import Intake
from bridge.matching import Rule
from bridge.spool import SpoolLayout, reason_path
from bridge.spoolread import spool_name
from bridge.statedb import StateDb
from bridge.store import NixStore, outputs_from_drv_file
from exporter.metrics import BridgeMetrics
from exporter.vocabulary import RejectReason
from tests.nixhelpers import Built, hydra_payload, offline_env
from tests.reliability.reporting import write_report

# ----------------------------------------------------------------------------- settings

EXAMPLES = 1000  # per source (in-process)
CLI_EXAMPLES = 40  # enqueue-hydra as a real subprocess: ~0.25 s each
SMALL_MAX_EVENT_BYTES = 8192  # so that generated payloads reach the size limit
HEALTH = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.large_base_example,
    HealthCheck.function_scoped_fixture,
]


def many(n: int = EXAMPLES) -> Any:
    """Hypothesis settings for one source: n cases, no deadline, no example database."""
    return settings(max_examples=n, deadline=None, suppress_health_check=HEALTH, database=None)


# The canary: every injection below would create this file if it ever reached a shell. The
# directory exists for the whole module (a `touch` into a missing directory proves nothing).
CANARY_DIR = Path("/tmp") / f"hcb-canary-{os.getpid()}-{uuid.uuid4().hex[:8]}"
CANARY = CANARY_DIR / "CANARY"
C = str(CANARY)
INJECTIONS = [
    f"$(touch {C})",
    f"`touch {C}`",
    f";touch {C}",
    f"|touch {C}",
    f"&&touch {C}",
    f"||touch {C}",
    f"\ntouch {C}\n",
    f"'$(touch {C})'",
    f'"$(touch {C})"',
    f'";touch {C};"',
    f"';touch {C};'",
    f"$(touch${{IFS}}{C})",
    f">{C}",
    f"<(touch {C})",
    f"x&touch {C}&",
]


@contextlib.contextmanager
def hostile_module(module_file: str, report: dict[str, Any], home: Path) -> Iterator[None]:
    """Around one test module: Hypothesis caches (constants, unicode tables) in `home`, not
    in the repository (the example database is off: see many()); the canary directory
    created; at the end the canary checked and the module's JSON report written."""
    set_hypothesis_home_dir(home)
    CANARY_DIR.mkdir(mode=0o777)
    CANARY_DIR.chmod(0o777)  # any user a shell might run as could create the canary
    try:
        yield
    finally:
        set_hypothesis_home_dir(None)
        created = CANARY.exists() or Path("CANARY").exists()
        report["canary_created"] = created
        report["canary"] = str(CANARY)
        module = Path(module_file).stem
        extra = {k: v for k, v in report.items() if k not in ("cases", "violations", "canary")}
        write_report(
            f"{module}.json",
            {
                **extra,
                "file": f"tests/reliability/{module}.py",
                "cases_per_source": dict(sorted(report["cases"].items())),
                "canary_created": created,
                "violations": report["violations"],
            },
        )
        shutil.rmtree(CANARY_DIR, ignore_errors=True)


def new_report() -> tuple[Counter[str], dict[str, Any]]:
    """A module's case counter and the report that holds it (and violations, outcomes)."""
    cases: Counter[str] = Counter()
    return cases, {"cases": cases, "violations": {}}


def assert_no_canary() -> None:
    assert not CANARY.exists(), f"shell injection: {CANARY} was created"


# ----------------------------------------------------------------------------- oracle

# Store path syntax from REFERENCE.md §4, written out here independently of bridge.storepath:
# /nix/store/ + 32 chars of Nix base-32 + '-' + a name of [A-Za-z0-9+-._?=] (max 211, not
# starting with '.').
_ORACLE = re.compile(r"/nix/store/[0-9a-df-np-sv-z]{32}-([A-Za-z0-9+\-._?=]{1,211})")


def oracle_store_path(value: object) -> bool:
    if not isinstance(value, str):
        return False
    found = _ORACLE.fullmatch(value)
    return found is not None and not found.group(1).startswith(".")


def strings_in(document: Any) -> set[str]:
    """Every string in a decoded JSON document, and every whitespace-separated word of each."""
    found: set[str] = set()
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.add(item)
            found.update(item.split())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return found


# ----------------------------------------------------------------------------- harness


@functools.cache
def instantiated(name: str) -> Built:
    """A derivation instantiated in the real store, never built: ingest checks a Hydra
    event's outputs against its `.drv` (issue 11), not whether they were built."""
    expr = (
        f'derivation {{ name = "{name}"; system = builtins.currentSystem;'
        ' builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }'
    )
    drv = subprocess.run(
        ["nix-instantiate", "--expr", expr],
        capture_output=True,
        text=True,
        env=offline_env(),
        check=True,
        timeout=120,
    ).stdout.strip()
    outputs = outputs_from_drv_file(drv)
    assert outputs is not None and len(outputs) == 1, drv
    return Built(name, drv, outputs[0])


def build_stub() -> Built:
    """A build whose derivation is in the store (its output need not exist for ingest)."""
    return instantiated("hello")


class Harness:
    """A real spool, SQLite queue, metrics registry and Ingestor under one directory."""

    def __init__(self, root: Path, max_event_bytes: int = 1024 * 1024) -> None:
        self.root = root
        self.registry = CollectorRegistry()
        self.metrics = BridgeMetrics(
            self.registry,
            version="test",
            caches={"c": "nix-copy"},
        )
        self.config = Config(
            state_dir=root / "state",
            spool_dir=root / "spool",
            caches=MappingProxyType(
                {"c": CacheConfig(name="c", backend="nix-copy", uri="file:///nonexistent")}
            ),
            rules=(Rule(caches=("c",), build_statuses=tuple(range(14))),),
            spool=SpoolSettings(max_event_bytes=max_event_bytes),
        )
        self.layout = SpoolLayout(self.config.spool_dir)
        self.layout.ensure()
        self.queue = StateDb(self.config.database_path)
        intake = Intake(self.config.rules, self.metrics, SystemClock())
        self.ingestor = Ingestor(self.config, self.queue, NixStore(), intake, SystemClock())
        self.parked = root / "parked"
        self.parked.mkdir()
        self.config_file = root / "bridge.toml"
        self.config_file.write_text(
            f"state_dir = {json.dumps(str(root / 'state'))}\n"
            f"spool_dir = {json.dumps(str(root / 'spool'))}\n"
            f"[spool]\nmax_event_bytes = {max_event_bytes}\n"
            '[caches.c]\nbackend = "nix-copy"\nuri = "file:///nonexistent"\n'
        )

    def close(self) -> None:
        self.queue.close()

    def rejected(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "hydra_cachix_bridge_events_rejected_total", {"reason": reason}
        )
        return value or 0.0

    def incoming(self) -> list[bytes]:
        return os.listdir(os.fsencode(self.layout.incoming))

    def park_leftovers(self) -> list[bytes]:
        """Move whatever is left in incoming/ aside so the next case starts clean."""
        left = self.incoming()
        for raw in left:
            src = os.path.join(os.fsencode(self.layout.incoming), raw)
            os.rename(src, os.path.join(os.fsencode(self.parked), uuid.uuid4().hex.encode()))
        return left

    def all_item_paths(self) -> list[str]:
        return [row[0] for row in self.queue.conn.execute("SELECT path FROM items ORDER BY id")]


class Violations:
    """Property violations by kind, keeping the smallest example of each kind."""

    def __init__(self, source: str, report: dict[str, Any]) -> None:
        self.source = source
        self.report = report
        self.counts: Counter[str] = Counter()
        self.smallest: dict[str, str] = {}
        self.recorded = False

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        if kind not in self.smallest or len(example) < len(self.smallest[kind]):
            self.smallest[kind] = example

    def exception(self, exc: BaseException, example: str) -> None:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/bridge/" in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "?"
        self.add(f"{type(exc).__name__} escaped from {where}", f"({exc!s:.100}) {example}")

    def record(self) -> None:
        """Add these counts to the JSON summary (once)."""
        if not self.recorded:
            self.recorded = True
            bucket = self.report["violations"].setdefault(self.source, {})
            for kind, count in self.counts.items():
                bucket[kind] = bucket.get(kind, 0) + count

    def check(self) -> None:
        self.record()
        if self.counts:
            lines = [f"{self.source}: {sum(self.counts.values())} violating case(s):"]
            for kind in sorted(self.counts):
                lines.append(f"  * {kind} [{self.counts[kind]} case(s)]")
                lines.append(f"      smallest: {self.smallest[kind][:700]}")
            pytest.fail("\n".join(lines), pytrace=False)


def describe(name: str | None, data: bytes) -> str:
    prefix = f"name={name!r} " if name is not None else ""
    return f"{prefix}data({len(data)} bytes)={data[:500]!r}"


def check_ingest(h: Harness, name: str, data: bytes, v: Violations) -> str | None:
    """Ingest the file `name` (already in incoming/ with `data`) with a rescan, like the
    daemon does, and check the outcome. Returns "recorded", "quarantined" or None."""
    ex = describe(name, data)
    before = {r: h.rejected(r) for r in set(RejectReason)}
    try:
        stats = h.ingestor.ingest(h.ingestor.scan())
    except Exception as exc:
        v.exception(exc, ex)
        h.park_leftovers()
        return None
    if h.park_leftovers():
        v.add("file left in incoming/", ex)
        return None
    if stats.deferred or stats.duplicates or stats.recorded + stats.quarantined != 1:
        moved = os.path.lexists(os.fsencode(h.layout.quarantine / name))
        with_reason = os.path.lexists(os.fsencode(h.layout.quarantine / f"{name}.reason"))
        if moved and not with_reason:
            v.add("moved into quarantine/ without a .reason file (and not counted)", ex)
        else:
            v.add(f"unexpected ingest stats {stats}", ex)
        return None
    if stats.recorded:
        row = h.queue.conn.execute(
            "SELECT id, drv_path, spool_name FROM events ORDER BY id DESC LIMIT 1"
        ).fetchone()
        # Undecodable bytes of a name are stored backslash-escaped (bridge.spoolread.spool_name).
        if row is None or row[2] != spool_name(Path(name)):
            v.add("recorded but no events row for the file", ex)
            return None
        event_id, drv, _ = row
        try:
            inputs = strings_in(json.loads(data.decode("utf-8")))
        except (ValueError, RecursionError):
            inputs = set()
        if drv is not None and not (oracle_store_path(drv) and drv.endswith(".drv")):
            v.add("accepted a drv_path that is not a derivation store path", f"{drv!r} {ex}")
        if drv is not None and drv not in inputs:
            v.add("accepted a drv_path that is not verbatim in the input", f"{drv!r} {ex}")
        for (path,) in h.queue.conn.execute(
            "SELECT path FROM items WHERE event_id = ?", (event_id,)
        ):
            if not oracle_store_path(path):
                v.add("queued a path that is not a valid store path", f"{path!r} {ex}")
            elif path not in inputs:
                v.add("queued a path that is not verbatim in the input", f"{path!r} {ex}")
        return "recorded"
    target = h.layout.quarantine / name
    # NAME.reason, or for a name too long for that, a shortened one (see spool.reason_path).
    reason_file = reason_path(target)
    if not os.path.lexists(target):
        v.add("quarantined but not under its own name in quarantine/", ex)
        return None
    if not reason_file.is_file():
        v.add("quarantined without a .reason file", ex)
        return None
    record = json.loads(reason_file.read_text())
    if (
        record.get("reason") not in set(RejectReason)
        or record.get("file") != name
        or record.get("quarantined_as") != name
    ):
        v.add(f"bad .reason record {record!r}", ex)
    elif h.rejected(record["reason"]) != before[record["reason"]] + 1:
        v.add("rejection not counted in events_rejected_total", ex)
    if target.read_bytes() != data:
        v.add("quarantined file content changed", ex)
    return "quarantined"


def make_recorder(directory: Path) -> tuple[Path, Path]:
    """An executable that appends {argv, stdin} as one JSON line to a log, and exits 0."""
    log = directory / "recorder.jsonl"
    script = directory / "recorder"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "data = sys.stdin.buffer.read()\n"
        "line = json.dumps({'argv': sys.argv[1:], 'stdin': data.decode('utf-8', 'replace'),\n"
        "                   'token': 'CACHIX_AUTH_TOKEN' in os.environ}) + '\\n'\n"
        f"fd = os.open({str(log)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)\n"
        "os.write(fd, line.encode())\n"
        "os.close(fd)\n"
    )
    script.chmod(0o755)
    return script, log


def recorded(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def check_backends_get_exact_paths(h: Harness, tmp_path: Path) -> int:
    """Push every queued path with both real backends to an argv-recording executable."""
    paths = sorted(set(h.all_item_paths()))
    if not paths:
        return 0
    recorder, log = make_recorder(tmp_path)
    cancel = threading.Event()
    cachix = CachixBackend(CacheConfig(name="rec", backend="cachix", executable=str(recorder)))
    outcome = cachix.push(paths, 60, cancel)
    assert outcome.ok, outcome
    [call] = recorded(log)
    assert call["argv"] == ["push", "rec"]
    assert call["stdin"].split("\n") == [*paths, ""]
    uri = "file:///nonexistent?compression=zstd"
    nix_copy = NixCopyBackend(
        CacheConfig(name="nc", backend="nix-copy", uri=uri, executable=str(recorder))
    )
    outcome = nix_copy.push(paths, 60, cancel)
    assert outcome.ok, outcome
    call = recorded(log)[1]
    assert call["argv"] == [
        "--extra-experimental-features",
        "nix-command",
        "copy",
        "--to",
        uri,
        "--",
        *paths,
    ]
    assert_no_canary()
    return len(paths)


HAND_WRITTEN_VALID = json.dumps(
    hook_envelope("", "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hello", 1.0)
).encode()


def hydra_doc(**changes: Any) -> bytes:
    payload = hydra_payload(7, build_stub())
    payload.update(changes)
    return json.dumps(hydra_envelope(payload, 1.0)).encode()
