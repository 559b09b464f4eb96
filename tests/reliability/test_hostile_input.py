"""Hostile input: Hydra payloads, raw spool files and post-build-hook environments.

Property-based (hypothesis) with real components: `decode_json`/`parse_hydra_payload`/
`write_event` as `enqueue-hydra` runs them (and the real CLI as a subprocess), the real
`Ingestor` with a real SQLite `StateDb` and real metrics, the real generated sh hook run by
/bin/sh, `enqueue-hook` in process, and the real daemon as a subprocess.

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

import functools
import json
import logging
import os
import re
import shutil
import socket
import stat
import string
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from prometheus_client import CollectorRegistry

from bridge.backends import CachixBackend, NixCopyBackend
from bridge.cli import main as cli_main
from bridge.clock import SystemClock
from bridge.config import CacheConfig, Config, Rule, SpoolSettings
from bridge.events import EventRejected, hook_envelope, hydra_envelope
from bridge.hookscript import render_hook_script
from bridge.ingest import Ingestor, spool_name
from bridge.producers import PayloadRejected, record_hydra_payload
from bridge.spool import SpoolLayout, reason_path
from bridge.statedb import StateDb
from bridge.store import NixStore, outputs_from_drv_file
from exporter.metrics import BridgeMetrics
from exporter.vocabulary import RejectReason
from tests.integration.daemonproc import DaemonProcess, bridge, enqueue_all, wait_for
from tests.nixhelpers import Built, build, hydra_payload, narinfo, offline_env

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

CASES: Counter[str] = Counter()
REPORT: dict[str, Any] = {"cases": CASES, "violations": {}}


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis caches (constants, unicode tables) go to a temporary directory, not into
    the repository (the example database is off: see many())."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis-home"))
    try:
        yield
    finally:
        set_hypothesis_home_dir(None)


@pytest.fixture(scope="module", autouse=True)
def canary_and_report() -> Iterator[None]:
    """Create the canary directory; at the end check the canary and write the JSON summary."""
    CANARY_DIR.mkdir(mode=0o777)
    CANARY_DIR.chmod(0o777)  # any user a shell might run as could create the canary
    try:
        yield
    finally:
        created = CANARY.exists() or Path("CANARY").exists()
        REPORT["canary_created"] = created
        REPORT["canary"] = str(CANARY)
        report_dir = os.environ.get("RELIABILITY_REPORT_DIR")
        if report_dir:
            Path(report_dir).mkdir(parents=True, exist_ok=True)
            out = {
                "file": "tests/reliability/test_hostile_input.py",
                "cases_per_source": dict(sorted(CASES.items())),
                "canary_created": created,
                "violations": REPORT["violations"],
            }
            (Path(report_dir) / "hostile_input.json").write_text(json.dumps(out, indent=2))
        shutil.rmtree(CANARY_DIR, ignore_errors=True)


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


# ----------------------------------------------------------------------------- strategies

HASH_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
NAME_ALPHABET = string.ascii_letters + string.digits + "+-._?="
FRAGMENTS = [
    *INJECTIONS,
    *";|&$()`'\"<>\n\r\t *?~\\",
    " ",
    "\x00",
    "\x7f",
    "\x1b[31m",
    "\ud800",
    "\udfff",
    "\udcff",
    "\u2028",
    "\u0085",
    "\ufeff",
    "\u00e9",
    "\U0001f4a3",
    "../",
    "/..",
    "..",
    "/",
    "\\u0000",
    "\\ud800",
    "%s%n",
    "--",
    "-",
    "=",
    "${HOME}",
]

hashes = st.text(HASH_ALPHABET, min_size=32, max_size=32)
store_names = st.text(NAME_ALPHABET, min_size=1, max_size=50).filter(
    lambda n: not n.startswith(".")
)
good_paths = st.builds(lambda h, n: f"/nix/store/{h}-{n}", hashes, store_names)
good_drvs = st.builds(lambda h, n: f"/nix/store/{h}-{n}.drv", hashes, store_names)
hostile_text = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=6).map("".join),
)


PATH_VARIANTS = [
    "/nix/store/{h}-{n}",
    "/nix/store/{h}-{n}{f}",
    "/nix/store/{h}-{f}{n}",
    "/nix/store/{h}-{n}/{f}",
    "/nix/store/{h}-{n}/../../../etc/passwd",
    "/nix/store/../{h}-{n}",
    "/nix/store/{h31}-{n}",
    "/nix/store/{h31}e-{n}",
    "/nix/store/{h}u-{n}",
    "/nix/store/{H}-{n}",
    " /nix/store/{h}-{n}",
    "/nix/store/{h}-{n}\n",
    "/nix/store/{h}-{n}\n/nix/store/{h}-{n}",
    "/nix/store/{h}-{long}",
    "/nix/store/{h}-.{n}",
    "/nix/store/{h}-{n}\x00",
    "//nix/store/{h}-{n}",
    "/nix//store/{h}-{n}",
    "/nix/store/{h}-{n}/",
    "/nix/store/{h}-",
    "/nix/store/{h}-{n} /nix/store/{h}-{n}",
    "{f}",
    "/nix/store/{h}-{n}{i}",
]


@st.composite
def hostile_paths(draw: st.DrawFn) -> str:
    """Valid store paths, and near misses: metacharacters, traversal, bad hash, newlines…"""
    template = draw(st.sampled_from(PATH_VARIANTS))
    h = draw(hashes)
    values = {
        "h": h,
        "h31": h[:31],
        "H": h.upper(),
        "n": draw(store_names),
        "long": "x" * 212,
        "f": draw(hostile_text) if "{f}" in template else "",
        "i": draw(st.sampled_from(INJECTIONS)) if "{i}" in template else "",
    }
    return template.format(**values)


BIG_NUMBERS = st.sampled_from(
    [
        -1,
        2**31,
        2**53 + 1,
        2**63 - 1,
        2**63,
        -(2**63) - 1,
        2**64,
        10**30,
        10**400,
        -(10**400),
        10**4299,
        1e308,
        -1e308,
        5e-324,
        1.5,
        float("inf"),
        float("nan"),
    ]
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    BIG_NUMBERS,
    st.floats(),
    st.text(max_size=20),
    hostile_text,
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), hostile_text), kids, max_size=4),
    ),
    max_leaves=10,
)
job_names = st.one_of(
    st.text(NAME_ALPHABET + ":", min_size=1, max_size=20),
    st.sampled_from(INJECTIONS),
    hostile_text,
)
HYDRA_FIELDS = [
    "event",
    "build",
    "finished",
    "timestamp",
    "startTime",
    "stopTime",
    "project",
    "jobset",
    "job",
    "drvPath",
    "buildStatus",
    "nixName",
    "system",
    "homepage",
    "description",
    "license",
    "outputs",
    "products",
    "metrics",
]


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@st.composite
def hydra_payloads(draw: st.DrawFn) -> dict[str, Any]:
    """A complete buildFinished payload (REFERENCE.md §1) with hostile mutations."""
    payload: dict[str, Any] = {
        "event": "buildFinished",
        "build": draw(st.integers(1, 10**9)),
        "finished": True,
        "timestamp": 1_700_000_000,
        "startTime": 1_700_000_010,
        "stopTime": draw(st.one_of(st.none(), st.integers(0, 2**40), st.floats(0, 1e12))),
        "project": draw(job_names),
        "jobset": draw(job_names),
        "job": draw(job_names),
        "drvPath": draw(good_drvs),
        "buildStatus": draw(st.sampled_from([0, 0, 0, 1, 2, 6, 13, None])),
        "nixName": draw(st.one_of(st.none(), hostile_text)),
        "system": "x86_64-linux",
        "homepage": None,
        "description": draw(st.one_of(st.none(), hostile_text)),
        "license": None,
        "outputs": draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.text(max_size=6), "path": st.one_of(good_paths, st.none())}
                ),
                max_size=4,
            )
        ),
        "products": [],
        "metrics": [{"name": "closure-size", "unit": "bytes", "value": 120}],
    }
    for _ in range(draw(st.integers(0, 3))):
        op = draw(
            st.sampled_from(["set", "delete", "add", "outputs", "number", "deep", "drv", "name"])
        )
        if op == "set":
            payload[draw(st.sampled_from(HYDRA_FIELDS))] = draw(json_values)
        elif op == "delete":
            payload.pop(draw(st.sampled_from(HYDRA_FIELDS)), None)
        elif op == "add":
            payload[draw(hostile_text)] = draw(json_values)
        elif op == "outputs":
            payload["outputs"] = draw(
                st.lists(
                    st.one_of(
                        st.fixed_dictionaries({"name": hostile_text, "path": hostile_paths()}),
                        json_values,
                    ),
                    max_size=5,
                )
            )
        elif op == "number":
            key = draw(st.sampled_from(["build", "buildStatus", "timestamp", "startTime"]))
            payload[draw(st.sampled_from([key, "stopTime"]))] = draw(BIG_NUMBERS)
        elif op == "deep":
            # Around Python's recursion limit, where decode and re-encode may disagree.
            payload["deep"] = nested(draw(st.integers(1, 1100)))
        elif op == "drv":
            payload["drvPath"] = draw(st.one_of(hostile_paths(), json_values))
        else:
            payload[draw(st.sampled_from(["project", "jobset", "job"]))] = draw(
                st.one_of(hostile_text, json_values, st.text(min_size=1000, max_size=1100))
            )
    return payload


def dump(draw: st.DrawFn, document: Any) -> bytes:
    """Serialise like a producer might (or might get wrong), then maybe corrupt the bytes."""
    text = json.dumps(
        document,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, None, 0, 2])),
    )
    # Lone surrogates become CESU-8-like bytes: not UTF-8.
    data = text.encode("utf-8", "surrogatepass")
    op = draw(st.sampled_from(["none"] * 6 + ["truncate", "nul", "ff", "bom", "flip", "tail"]))
    if op == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif op == "nul":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\x00" + data[at:]
    elif op == "ff":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff\xfe" + data[at:]
    elif op == "bom":
        data = b"\xef\xbb\xbf" + data
    elif op == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif op == "tail":
        data += draw(st.sampled_from([b"\n", b" {}", b"]", b"\x00", b"\n{}\n"]))
    return data


@st.composite
def hydra_payload_bytes(draw: st.DrawFn) -> bytes:
    payload = draw(hydra_payloads())
    if draw(st.integers(0, 7)) == 0:
        # Pad the (compact) payload to just below, at or just above the size limit.
        target = draw(st.integers(SMALL_MAX_EVENT_BYTES - 120, SMALL_MAX_EVENT_BYTES + 2))
        payload["description"] = ""
        compact = {"separators": (",", ":")}
        size = len(json.dumps(payload, **compact).encode("utf-8", "surrogatepass"))
        payload["description"] = "d" * max(0, target - size)
        return json.dumps(payload, **compact).encode("utf-8", "surrogatepass")
    return dump(draw, payload)


@st.composite
def spool_documents(draw: st.DrawFn) -> Any:
    """Spool envelopes (hydra and hook) with hostile mutations of every field."""
    kind = draw(st.sampled_from(["hydra", "hook"]))
    if kind == "hydra":
        doc = hydra_envelope(draw(hydra_payloads()), 1_764_030_000.5)
    else:
        outs = draw(st.lists(st.one_of(good_paths, hostile_paths()), max_size=4))
        sep = draw(st.sampled_from([" ", "  ", "\t", "\n", " \n "]))
        doc = hook_envelope(
            draw(st.one_of(good_drvs, st.just(""), hostile_paths())),
            sep.join(outs),
            1_764_030_000.5,
        )
    for _ in range(draw(st.integers(0, 2))):
        key = draw(
            st.sampled_from(
                ["version", "kind", "received_at", "drv_path", "out_paths", "payload", "extra"]
            )
        )
        choice = draw(st.integers(0, 3))
        if choice == 0:
            doc.pop(key, None)
        elif key == "version":
            doc[key] = draw(st.sampled_from([0, 2, 1.0, True, "1", None, 10**400, [1]]))
        elif key == "kind":
            doc[key] = draw(st.sampled_from(["HYDRA", "log", "", None, 1, ["hook"], "hook\x00"]))
        elif key == "received_at":
            doc[key] = draw(st.one_of(BIG_NUMBERS, json_values))
        else:
            doc[key] = draw(json_values)
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)
    return doc


@st.composite
def spool_file_bytes(draw: st.DrawFn) -> bytes:
    source = draw(st.sampled_from(["envelope"] * 6 + ["bytes", "json", "deep", "number"]))
    if source == "bytes":
        return draw(st.binary(max_size=300))
    if source == "json":
        return dump(draw, draw(json_values))
    if source == "deep":
        depth = draw(st.one_of(st.integers(1, 2000), st.integers(2000, 200_000)))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    if source == "number":
        digits = draw(st.integers(300, 6000))
        return (
            b'{"version":1,"kind":"hook","received_at":'
            + b"9" * digits
            + b',"out_paths":"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a"}'
        )
    return dump(draw, draw(spool_documents()))


NAME_FRAGMENTS = [
    *["..", "\n", " ", "$(reboot)", "`id`", ";", "|", "'", '"', "\r", "\t", "\x1b[2J"],
    *[".json", "-", "*", "?", "~", "\u2028", "\udcff"],
]


@st.composite
def file_names(draw: st.DrawFn) -> str:
    """Candidate file names (as the daemon sees them): newlines, shell syntax, '..', long
    names, non-UTF-8 bytes. A numeric prefix keeps them unique and not dotfiles."""
    kind = draw(st.sampled_from(["plain", "text", "fragment", "bytes", "long"]))
    if kind == "plain":
        suffix = ".json"
    elif kind == "text":
        # Text a name can be (no lone surrogates: undecodable bytes are the "bytes" kind).
        suffix = draw(
            st.text(
                st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                max_size=30,
            )
        )
    elif kind == "fragment":
        suffix = "".join(
            draw(
                st.lists(
                    st.sampled_from(NAME_FRAGMENTS),
                    max_size=6,
                )
            )
        )
    elif kind == "bytes":
        raw = draw(st.binary(max_size=30)).replace(b"/", b"").replace(b"\x00", b"")
        suffix = os.fsdecode(raw)
    else:
        suffix = "L" * draw(st.integers(200, 260))
    return suffix


def unique_name(counter: int, suffix: str) -> str:
    raw = f"{counter:06d}-".encode() + os.fsencode(suffix)
    raw = raw[:255]
    name = os.fsdecode(raw)
    if name.endswith((".tmp", ".reason")):
        name = name[:-1] + "x"
    return name


env_bytes = st.one_of(
    st.none(),
    st.just(b""),
    good_drvs.map(str.encode),
    hostile_paths().map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=80),
    st.sampled_from(INJECTIONS).map(str.encode),
).map(lambda b: None if b is None else b.replace(b"\x00", b""))


@st.composite
def out_paths_bytes(draw: st.DrawFn) -> bytes | None:
    if draw(st.integers(0, 5)) == 0:
        return draw(env_bytes)
    parts = draw(
        st.lists(
            st.one_of(good_paths.map(str.encode), env_bytes.map(lambda b: b or b"")),
            max_size=4,
        )
    )
    sep = draw(st.sampled_from([b" ", b"  ", b"\t", b"\n"]))
    return sep.join(parts).replace(b"\x00", b"")


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
        self.ingestor = Ingestor(self.config, self.queue, NixStore(), self.metrics, SystemClock())
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

    def __init__(self, source: str) -> None:
        self.source = source
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
            bucket = REPORT["violations"].setdefault(self.source, {})
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
    before = {r: h.rejected(r) for r in RejectReason}
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
        # Undecodable bytes of a name are stored backslash-escaped (bridge.ingest.spool_name).
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


# ============================================================================ (a) Hydra payloads


def padded_payload(size: int) -> bytes:
    """A valid compact payload of exactly `size` bytes."""
    payload = hydra_payload(2, build_stub()) | {"description": ""}
    compact = {"separators": (",", ":")}
    payload["description"] = "d" * (size - len(json.dumps(payload, **compact)))
    return json.dumps(payload, **compact).encode()


def enqueue_hydra_in_process(
    layout: SpoolLayout, data: bytes, max_bytes: int
) -> tuple[str, Any, Path]:
    """What `enqueue-hydra` does with the payload bytes (bridge.producers), in process."""
    try:
        event, target = record_hydra_payload(layout, data, max_bytes, time.time())
    except PayloadRejected as exc:
        assert exc.saved_as is not None, exc.save_error
        return "rejected", EventRejected(exc.reason, exc.message), exc.saved_as
    return "accepted", event, target


def test_hydra_payloads_in_process(tmp_path: Path) -> None:
    """(a) enqueue-hydra's validation and spool write, then the daemon's ingest of the file:
    what the producer accepts, the daemon records; what it rejects is quarantined verbatim."""
    h = Harness(tmp_path, max_event_bytes=SMALL_MAX_EVENT_BYTES)
    v = Violations("hydra_payload_in_process")
    outcomes: Counter[str] = Counter()

    @many()
    @given(data=hydra_payload_bytes())
    def run(data: bytes) -> None:
        CASES["hydra_payload_in_process"] += 1
        ex = describe(None, data)
        try:
            verdict, result, path = enqueue_hydra_in_process(h.layout, data, SMALL_MAX_EVENT_BYTES)
        except Exception as exc:
            v.exception(exc, ex)
            h.park_leftovers()
            return
        outcomes[verdict] += 1
        if verdict == "rejected":
            if result.reason not in set(RejectReason):
                v.add(f"unknown reject reason {result.reason!r}", ex)
            reason = json.loads(Path(f"{path}.reason").read_text())
            if reason["reason"] != result.reason or path.read_bytes() != data:
                v.add("quarantined payload or .reason does not match", ex)
            if stat.S_IMODE(path.stat().st_mode) & 0o007:
                v.add("quarantined payload is world-accessible", ex)
            if h.incoming():
                v.add("rejected payload left a file in incoming/", ex)
                h.park_leftovers()
            return
        event = result
        for p in (*event.out_paths, event.drv_path):
            if not oracle_store_path(p):
                v.add("accepted a payload with an invalid store path", f"{p!r} {ex}")
        if stat.S_IMODE(path.stat().st_mode) & 0o002:
            v.add("event file is world-writable", ex)
        # The daemon must record what the producer reported as recorded.
        try:
            stats = h.ingestor.ingest(h.ingestor.scan())
        except Exception as exc:
            v.exception(exc, "daemon ingest of an accepted payload: " + ex)
            h.park_leftovers()
            return
        # Only the store can say whether the outputs belong to drvPath (issue 11): a payload
        # naming outputs of a made-up derivation is quarantined as unresolved_outputs.
        unverifiable = bool(event.out_paths) and not os.path.lexists(event.drv_path or "")
        if stats.quarantined:
            reason = json.loads((h.layout.quarantine / f"{path.name}.reason").read_text())
            if not (unverifiable and reason["reason"] == "unresolved_outputs"):
                v.add(
                    "enqueue-hydra accepted a payload that the daemon quarantines as "
                    + reason["reason"],
                    f"({reason['message'][:80]}) {ex}",
                )
        elif unverifiable:
            v.add("recorded outputs that no derivation in the store vouches for", ex)
        elif stats.recorded != 1:
            v.add(f"accepted payload not recorded by the daemon: {stats}", ex)
        else:
            row = h.queue.conn.execute(
                "SELECT build_id, project, jobset, job, drv_path, build_status FROM events"
                " WHERE spool_name = ?",
                (path.name,),
            ).fetchone()
            expected = (
                event.build_id,
                event.project,
                event.jobset,
                event.job,
                event.drv_path,
                event.build_status,
            )
            if row != expected:
                v.add("recorded event differs from the accepted payload", ex)
        if h.park_leftovers():
            v.add("file left in incoming/ after ingest", ex)

    try:
        run()
        v.record()
        REPORT.setdefault("outcomes", {})["hydra_payload_in_process"] = dict(outcomes)
        CASES["backend_paths_checked"] += check_backends_get_exact_paths(h, tmp_path)
        assert_no_canary()
        v.check()
        assert CASES["hydra_payload_in_process"] >= EXAMPLES
        assert outcomes["accepted"] > 50 and outcomes["rejected"] > 50, outcomes
    finally:
        h.close()


def unverifiable_payload(data: bytes) -> bool:
    """A payload naming outputs of a derivation that is not in the store."""
    payload = json.loads(data)
    named = [o.get("path") for o in payload.get("outputs") or [] if isinstance(o, dict)]
    drv = payload.get("drvPath")
    return any(named) and not (isinstance(drv, str) and os.path.lexists(drv))


def test_hydra_payloads_through_the_real_cli(tmp_path: Path) -> None:
    """(a) A smaller number of payloads through `python -m bridge enqueue-hydra`: exit 0 and
    a file the daemon records, or exit 1 with a one-line reason and the payload quarantined.
    Never a traceback."""
    h = Harness(tmp_path, max_event_bytes=SMALL_MAX_EVENT_BYTES)
    v = Violations("hydra_payload_cli")
    counter = iter(range(10**6))

    @many(CLI_EXAMPLES)
    @given(data=hydra_payload_bytes(), via_env=st.booleans())
    @example(
        data=json.dumps(hydra_payload(1, build_stub()) | {"stopTime": 10**400}).encode(),
        via_env=True,
    )
    @example(data=padded_payload(SMALL_MAX_EVENT_BYTES), via_env=False)
    def run(data: bytes, via_env: bool) -> None:
        CASES["hydra_payload_cli"] += 1
        ex = describe(None, data)
        payload_file = tmp_path / f"payload-{next(counter)}.json"
        payload_file.write_bytes(data)
        args = ["enqueue-hydra", "--config", str(h.config_file)]
        env = dict(os.environ)
        if via_env:
            env["HYDRA_JSON"] = str(payload_file)
        else:
            args += ["--json-file", str(payload_file)]
        quarantined_before = set(os.listdir(h.layout.quarantine))
        done = bridge(*args, env=env)
        if "Traceback" in done.stderr:
            last = done.stderr.strip().splitlines()[-1]
            v.add(f"enqueue-hydra crashed with a traceback: {last[:160]}", ex)
        new_quarantine = set(os.listdir(h.layout.quarantine)) - quarantined_before
        if done.returncode == 0:
            if not done.stdout.startswith("recorded build ") or new_quarantine:
                v.add("exit 0 without 'recorded build' or with a quarantined file", ex)
            known = set(h.layout.quarantine.glob("*.reason"))
            stats = h.ingestor.ingest(h.ingestor.scan())
            new = set(h.layout.quarantine.glob("*.reason")) - known
            if stats.quarantined and len(new) == 1:
                reason = json.loads(new.pop().read_text())["reason"]
                # Outputs of a made-up drvPath: only the store can tell (issue 11).
                if not (reason == "unresolved_outputs" and unverifiable_payload(data)):
                    v.add(f"enqueue-hydra said recorded, the daemon quarantines it as {reason}", ex)
            elif stats.recorded != 1:
                v.add(f"enqueue-hydra said recorded, the daemon did not record it: {stats}", ex)
        elif done.returncode == 1 and "Traceback" not in done.stderr:
            lines = done.stderr.strip().splitlines()
            found = re.match(r"hydra-cachix-bridge: invalid Hydra payload \((\w+)\)", lines[0])
            if len(lines) != 1 or found is None or found.group(1) not in set(RejectReason):
                v.add(f"exit 1 without a one-line reason: {done.stderr[:200]!r}", ex)
            saved = [n for n in new_quarantine if not n.endswith(".reason")]
            content = (h.layout.quarantine / saved[0]).read_bytes() if len(saved) == 1 else None
            # An oversized payload is read only up to the limit (+1 byte): that prefix is saved.
            expected = data if len(data) <= SMALL_MAX_EVENT_BYTES else data[: len(content or "")]
            if content != expected or len(content) < min(len(data), SMALL_MAX_EVENT_BYTES):
                v.add("rejected payload not saved in quarantine/", ex)
        elif done.returncode != 1:
            v.add(f"unexpected exit status {done.returncode}", ex)
        h.park_leftovers()

    try:
        run()
        assert_no_canary()
        v.check()
        assert CASES["hydra_payload_cli"] >= CLI_EXAMPLES
    finally:
        h.close()


def test_enqueue_hydra_payload_nested_just_below_the_decode_limit(tmp_path: Path) -> None:
    """Nesting just below the depth decode_json rejects: enqueue-hydra must either record the
    payload or reject it with a reason, never crash with a traceback (decoding and the spool
    write's re-encoding have different stack depths)."""
    h = Harness(tmp_path)
    base = json.dumps(
        hydra_payload(
            1,
            build_stub(),
        )
    )

    def payload(depth: int) -> Path:
        path = tmp_path / f"deep-{depth}.json"
        path.write_text(base[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")
        return path

    def run(depth: int) -> subprocess.CompletedProcess[str]:
        return bridge(
            "enqueue-hydra", "--config", str(h.config_file), "--json-file", str(payload(depth))
        )

    # Binary search for the smallest depth the real CLI rejects as nested too deeply.
    low, high = 500, 1500
    while low + 1 < high:
        mid = (low + high) // 2
        if "nested too deeply" in run(mid).stderr:
            high = mid
        else:
            low = mid
    crashes = []
    for depth in range(high - 4, high):
        done = run(depth)
        CASES["hydra_payload_cli_deep"] += 1
        if "Traceback" in done.stderr or done.returncode not in (0, 1):
            crashes.append((depth, done.returncode, done.stderr.strip().splitlines()[-1]))
    h.close()
    assert crashes == [], (
        f"enqueue-hydra crashed (no quarantine, no one-line reason) just below the decode "
        f"limit of depth {high}: {crashes}"
    )


# ============================================================================ (b) spool files


def test_raw_spool_files_through_the_ingestor(tmp_path: Path) -> None:
    """(b) Arbitrary bytes, arbitrary JSON, mutated envelopes, hostile names: every file is
    recorded (valid store paths only) or quarantined with a reason; nothing stays behind."""
    h = Harness(tmp_path)
    v = Violations("spool_file")
    counter = iter(range(10**6))
    outcomes: Counter[str] = Counter()

    @many()
    @given(data=spool_file_bytes(), suffix=file_names())
    def run(data: bytes, suffix: str) -> None:
        CASES["spool_file"] += 1
        name = unique_name(next(counter), suffix)
        path = h.layout.incoming / name
        with open(os.fsencode(path), "wb") as handle:
            handle.write(data)
        old = time.time() - 60  # past settling: invalid JSON is quarantined at once
        os.utime(os.fsencode(path), (old, old))
        outcomes[str(check_ingest(h, name, data, v))] += 1

    try:
        run()
        v.record()
        REPORT.setdefault("outcomes", {})["spool_file"] = dict(outcomes)
        CASES["backend_paths_checked"] += check_backends_get_exact_paths(h, tmp_path)
        assert_no_canary()
        v.check()
        assert CASES["spool_file"] >= EXAMPLES
        # Both branches well exercised (the generator favours hostile input).
        assert outcomes["recorded"] > 20 and outcomes["quarantined"] > 50, outcomes
    finally:
        h.close()


HAND_WRITTEN_VALID = json.dumps(
    hook_envelope("", "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hello", 1.0)
).encode()


def hydra_doc(**changes: Any) -> bytes:
    payload = hydra_payload(7, build_stub())
    payload.update(changes)
    return json.dumps(hydra_envelope(payload, 1.0)).encode()


HAND_WRITTEN = [
    # (file name, content, expected outcome: "recorded" or a reject reason)
    ("a..b.json", HAND_WRITTEN_VALID, "recorded"),
    ("x..", HAND_WRITTEN_VALID, "recorded"),
    ("x..\n..json", b"{", "invalid_json"),
    ("new\nline.json", HAND_WRITTEN_VALID, "recorded"),
    ("new\nline-bad.json", b"\xff", "invalid_encoding"),
    ("\n", b"[]", "invalid_event"),
    (f"$(touch {CANARY.name}) `id`;|&.json", HAND_WRITTEN_VALID, "recorded"),
    ("\x1b[2J\x1b[31mred.json", b"null", "invalid_event"),
    ("n" * 200 + ".json", b"{", "invalid_json"),
    ("n" * 248, b"{", "invalid_json"),
    ("n" * 249, b"{", "invalid_json"),
    ("n" * 255, b"{", "invalid_json"),
    ("n" * 255, HAND_WRITTEN_VALID, "recorded"),
    (os.fsdecode(b"\xff\xfe.json"), b"{", "invalid_json"),
    (os.fsdecode(b"\xc3\x28-bad-utf8.json"), HAND_WRITTEN_VALID, "recorded"),
    ("deep-100000.json", b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
    ("deep-object.json", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "invalid_json"),
    (
        "newline-in-output-path.json",
        hydra_doc(
            outputs=[
                {
                    "name": "out",
                    "path": "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hello\n"
                    "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-evil",
                }
            ]
        ),
        "invalid_store_path",
    ),
    (
        "newline-in-drv.json",
        hydra_doc(drvPath="/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hel\nlo.drv"),
        "invalid_store_path",
    ),
    (
        "newline-in-job.json",
        hydra_doc(job=f"pkg\n$(touch {C})"),
        "invalid_event",
    ),
    ("shell-in-job.json", hydra_doc(job=f"$(touch {C})`touch {C}`;touch {C}"), "recorded"),
    ("build-id-2**63.json", hydra_doc(build=2**63), "recorded-or-rejected"),
    ("status-2**63.json", hydra_doc(buildStatus=2**63), "recorded-or-rejected"),
    ("timestamp-10**400.json", hydra_doc(timestamp=10**400), "invalid_event"),
    ("stoptime-10**400.json", hydra_doc(stopTime=10**400), "invalid_event"),
    (
        "received-at-10**400.json",
        json.dumps({**json.loads(HAND_WRITTEN_VALID), "received_at": 10**400}).encode(),
        "invalid_event",
    ),
    ("nul-bytes.json", b'{"version":1,\x00"kind":"hook"}', "invalid_json"),
    (
        "lone-surrogate.json",
        b'{"version":1,"kind":"hook","drv_path":"\\ud800"}',
        "invalid_encoding",
    ),
    ("huge-int-literal.json", b'{"version":' + b"1" * 5000 + b"}", "invalid_json"),
]


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    HAND_WRITTEN,
    ids=[
        f"{i}-{n[:24].encode('unicode_escape').decode()}"
        for i, (n, _, _) in enumerate(HAND_WRITTEN)
    ],
)
def test_hand_written_spool_files(
    tmp_path: Path, name: str, data: bytes, expected: str | None
) -> None:
    """Names with '..', newlines, terminal escapes, non-UTF-8 bytes and up to 255 bytes; JSON
    nested 100,000 deep; a path with a newline; numbers that overflow a double or SQLite."""
    h = Harness(tmp_path)
    v = Violations("hand_written")
    path = os.path.join(os.fsencode(h.layout.incoming), os.fsencode(name))
    with open(path, "wb") as handle:
        handle.write(data)
    old = time.time() - 60
    os.utime(path, (old, old))
    outcome = check_ingest(h, name, data, v)
    CASES["spool_file_hand_written"] += 1
    h.close()
    v.check()
    if expected == "recorded":
        assert outcome == "recorded"
    elif expected == "recorded-or-rejected":
        assert outcome in ("recorded", "quarantined")
    elif expected is not None:
        assert outcome == "quarantined"
        reason = json.loads(reason_path(h.layout.quarantine / name).read_text())
        assert reason["reason"] == expected
    assert_no_canary()


def test_fifty_megabyte_file_is_quarantined_without_reading_it(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    path = h.layout.incoming / "big.json"
    with path.open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)
    started = time.monotonic()
    stats = h.ingestor.ingest(h.ingestor.scan())
    elapsed = time.monotonic() - started
    h.close()
    assert stats.quarantined == 1 and h.incoming() == []
    reason = json.loads((h.layout.quarantine / "big.json.reason").read_text())
    assert reason["reason"] == "too_large"
    assert (h.layout.quarantine / "big.json").stat().st_size == 50 * 1024 * 1024
    assert elapsed < 5


def test_file_names_cannot_forge_log_lines(tmp_path: Path) -> None:
    """A spool writer chooses the file name; the daemon logs it. A newline or a terminal
    escape in the name must not start a forged line (or repaint a terminal) in the log."""
    h = Harness(tmp_path)
    forged = "\n2026-01-01 00:00:00,000 INFO bridge.worker: pushed 999 path(s) to c in 0.01s"
    for name in (f"a{forged}.json", f"b{forged}\x1b[2K.json"):
        (h.layout.incoming / name).write_bytes(b"{not json")
        os.utime(h.layout.incoming / name, (1.0, 1.0))
    (h.layout.incoming / f"c{forged}.json").write_bytes(HAND_WRITTEN_VALID)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("bridge")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        h.ingestor.ingest(h.ingestor.scan())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        h.close()
    messages = [r.getMessage() for r in records]
    assert len(messages) >= 3
    bad = [m for m in messages if "\n" in m or "\x1b" in m]
    assert bad == [], f"log messages with raw newlines/escapes from file names: {bad}"


# ============================================================================ (c) hook environments


def run_hook(
    hook: Path, cwd: Path, drv: bytes | None, outs: bytes | None
) -> subprocess.CompletedProcess[bytes]:
    env: dict[bytes, bytes] = {b"PATH": os.environb[b"PATH"], b"LC_ALL": b"C"}
    if drv is not None:
        env[b"DRV_PATH"] = drv
    if outs is not None:
        env[b"OUT_PATHS"] = outs
    return subprocess.run(
        ["/bin/sh", str(hook)], env=env, cwd=cwd, capture_output=True, timeout=30, check=False
    )


def hook_files_to_incoming(h: Harness, v: Violations, ex: str) -> None:
    """Move what the hook wrote into its own directory into (this private) incoming/, where
    check_ingest looks; each file must be one complete line."""
    for name in os.listdir(h.layout.hook):
        if not (h.layout.hook / name).read_bytes().endswith(b"\n"):
            v.add("hook left an incomplete file", ex)
        os.rename(h.layout.hook / name, h.layout.incoming / name)


def test_hook_environments_through_the_sh_hook(tmp_path: Path) -> None:
    """(c) DRV_PATH/OUT_PATHS with arbitrary bytes through the generated hook run by /bin/sh,
    then through the daemon's ingest: exit 0 always; recorded (valid paths only) or
    quarantined; one complete file per build in the hook's directory; no canary."""
    h = Harness(tmp_path)
    v = Violations("hook_sh")
    hook = tmp_path / "post-build-hook"
    hook.write_text(render_hook_script(h.layout))
    hook.chmod(0o755)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    outcomes: Counter[str] = Counter()
    started = time.monotonic()

    @many()
    @given(drv=env_bytes, outs=out_paths_bytes())
    def run(drv: bytes | None, outs: bytes | None) -> None:
        CASES["hook_env_sh"] += 1
        ex = f"DRV_PATH={drv!r} OUT_PATHS={outs!r}"
        done = run_hook(hook, cwd, drv, outs)
        if done.returncode != 0:
            v.add(f"hook exited {done.returncode}", ex)
        hook_files_to_incoming(h, v, ex)
        files = h.incoming()
        if not files:
            if b"could not record" not in done.stderr:
                v.add("hook recorded nothing and said nothing", ex)
            outcomes["not recorded"] += 1
            return
        if len(files) != 1:
            v.add(f"hook wrote {len(files)} files", ex)
            h.park_leftovers()
            return
        name = os.fsdecode(files[0])
        data = (h.layout.incoming / name).read_bytes()
        old = time.time() - 60
        os.utime(h.layout.incoming / name, (old, old))
        outcomes[str(check_ingest(h, name, data, v))] += 1

    try:
        run()
        elapsed = time.monotonic() - started
        REPORT.setdefault("outcomes", {})["hook_env_sh"] = dict(outcomes)
        REPORT["hook_env_sh_seconds"] = round(elapsed, 1)
        assert_no_canary()
        assert not (cwd / "CANARY").exists()
        v.check()
        assert CASES["hook_env_sh"] >= EXAMPLES
        # Both branches well exercised (the generator favours hostile input).
        assert outcomes["recorded"] > 20 and outcomes["quarantined"] > 50, outcomes
    finally:
        h.close()


def test_hook_environments_through_enqueue_hook_in_process(tmp_path: Path) -> None:
    """(c) The same environments through `enqueue-hook` (click command, in process): exit 0
    always; recorded and then recorded or quarantined by the daemon, or a warning that the
    build was not recorded (environment bytes that are not UTF-8)."""
    h = Harness(tmp_path)
    v = Violations("hook_enqueue_hook")
    runner = CliRunner()
    outcomes: Counter[str] = Counter()

    @many()
    @given(drv=env_bytes, outs=out_paths_bytes())
    def run(drv: bytes | None, outs: bytes | None) -> None:
        CASES["hook_env_enqueue_hook"] += 1
        ex = f"DRV_PATH={drv!r} OUT_PATHS={outs!r}"
        env = {
            "DRV_PATH": None if drv is None else os.fsdecode(drv),
            "OUT_PATHS": None if outs is None else os.fsdecode(outs),
        }
        result = runner.invoke(cli_main, ["enqueue-hook", "--config", str(h.config_file)], env=env)
        if result.exit_code != 0:
            v.add(f"enqueue-hook exited {result.exit_code}: {result.exception!r}", ex)
        hook_files_to_incoming(h, v, ex)
        files = h.incoming()
        if not files:
            if "build not recorded" not in result.output:
                v.add("enqueue-hook recorded nothing and said nothing", ex)
            outcomes["not recorded"] += 1
            return
        name = os.fsdecode(files[0])
        data = (h.layout.incoming / name).read_bytes()
        outcomes[str(check_ingest(h, name, data, v))] += 1

    try:
        run()
        REPORT.setdefault("outcomes", {})["hook_env_enqueue_hook"] = dict(outcomes)
        assert_no_canary()
        v.check()
        assert CASES["hook_env_enqueue_hook"] >= EXAMPLES
        # Both branches well exercised (the generator favours hostile input).
        assert outcomes["recorded"] > 20 and outcomes["quarantined"] > 50, outcomes
    finally:
        h.close()


# ============================================================================ the real daemon


def cachix_cache(tmp_path: Path) -> str:
    token = tmp_path / "token"
    token.write_text("tok-hostile-test\n")
    return f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{token}"\n'


def recorder_caches(recorder: Path) -> str:
    return (
        f'[caches.recx]\nbackend = "cachix"\nexecutable = "{recorder}"\n'
        f'[caches.recn]\nbackend = "nix-copy"\nuri = "file:///nonexistent"\n'
        f'executable = "{recorder}"\n'
    )


def put(layout: SpoolLayout, name: str | bytes, data: bytes) -> None:
    """Write like a producer: into tmp/, then rename into incoming/."""
    raw = os.fsencode(name)
    tmp = os.path.join(os.fsencode(layout.tmp), b"w-" + uuid.uuid4().hex.encode())
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.rename(tmp, os.path.join(os.fsencode(layout.incoming), raw))


HOSTILE_BURST: list[tuple[str, bytes]] = [
    (f"burst-{i:03d}.json", data)
    for i, data in enumerate(
        [
            b"",
            b"{",
            b"\x00" * 64,
            b"\xff\xfe\xfd",
            b"[]",
            b"null",
            b'"\\ud800"',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"version":1,"kind":"hook","drv_path":"x","out_paths":"$(touch '
            + C.encode()
            + b')"}',
            b'{"version":1,"kind":"hook","out_paths":"/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-a;'
            b"touch " + C.encode() + b'"}',
            b'{"version":1,"kind":"hook","out_paths":"/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-a\\n'
            b'/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-b|x"}',
            b'{"version":1,"kind":"hook","out_paths":"/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-a/..'
            b'/../../etc/passwd"}',
            b'{"version":"1","kind":"hook","out_paths":""}',
            b'{"version":1,"kind":"hook","received_at":"now","out_paths":""}',
            b'{"version":1,"kind":"hook","received_at":1e999,"out_paths":""}',
            b'{"version":1,"kind":"hydra","payload":[]}',
            hydra_doc(drvPath=f"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x`touch {C}`.drv"),
            hydra_doc(outputs=[{"name": "out", "path": f"/nix/store/x$(touch {C})"}]),
            hydra_doc(job="x\n$(touch " + C + ")"),
            hydra_doc(project=""),
            hydra_doc(build="1"),
            hydra_doc(build=True),
            hydra_doc(outputs={"out": "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-a"}),
        ]
    )
]
# Valid events with shell syntax where it is legal (job names) and the legal odd characters
# of store path names: accepted, pushed, and no shell ever sees them.
# A Hydra event's output must be an output of its drvPath: a real derivation with that name.
ODD_PATH = instantiated("a?b=c+d-_e.f").out
ODD_PATH_2 = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x=?+.-_"
VALID_HOSTILE: list[tuple[str, bytes]] = [
    (
        "valid-shell-job.json",
        hydra_doc(
            project=f"$(touch {C})",
            jobset=f"`touch {C}`",
            job=f";touch {C}|touch {C}&&touch {C}>{C}",
            drvPath=instantiated("a?b=c+d-_e.f").drv,
            outputs=[{"name": "out", "path": ODD_PATH}],
        ),
    ),
    (
        "valid-odd-hook.json",
        json.dumps(hook_envelope("", f"{ODD_PATH_2}", 1.0)).encode(),
    ),
]


def test_daemon_survives_a_burst_of_hostile_files_and_still_pushes(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    """The real daemon gets a burst of hostile files, a FIFO, a symlink, a directory, a 50 MB
    file and JSON nested 100,000 deep: it quarantines each with a reason, never blocks, stays
    healthy, hands the legal odd paths to the backends as exact argv/stdin strings, and then
    still pushes a valid build. (Names of 249+ bytes, numbers that overflow, non-UTF-8 names
    and hard links have their own tests below.)"""
    recorder, log = make_recorder(tmp_path)
    daemon = daemon_factory(
        "[push]\nbackoff_initial_seconds = 0.2\nbackoff_max_seconds = 0.5\n"
        + cachix_cache(tmp_path)
        + recorder_caches(recorder)
    )
    layout = SpoolLayout(tmp_path / "state" / "spool")
    outside = tmp_path / "outside.json"
    outside.write_bytes(HAND_WRITTEN_VALID)
    outside_before = (outside.read_bytes(), outside.stat().st_mtime_ns)
    special = ["fifo.json", "symlink.json", "dangling.json", "loop.json", "directory.json"]
    os.mkfifo(layout.incoming / "fifo.json")
    os.symlink(outside, layout.incoming / "symlink.json")
    os.symlink(tmp_path / "missing", layout.incoming / "dangling.json")
    os.symlink(layout.incoming / "loop.json", layout.incoming / "loop.json")
    os.mkdir(layout.incoming / "directory.json")
    (layout.incoming / "directory.json" / "inner.json").write_bytes(HAND_WRITTEN_VALID)
    with (layout.tmp / "big").open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)
    os.rename(layout.tmp / "big", layout.incoming / "big.json")
    special.append("big.json")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(layout.incoming / "socket.json"))
    burst = HOSTILE_BURST + [
        (f"hostile-name-{i}-{suffix}", HAND_WRITTEN_VALID if i % 2 else b"{")
        for i, suffix in enumerate(
            ["..", "a\nb", " ", "$(touch x)", "`id`", "\x1b[2J", "x" * 200, "-rf", "*"]
        )
    ]
    for name, data in burst + VALID_HOSTILE:
        put(layout, name, data)
    # Not candidates: left alone by design (in progress), never read or moved.
    for name in (".in-progress.json", "partial.json.tmp"):
        (layout.incoming / name).write_bytes(b"{")
    CASES["daemon_burst_files"] += len(special) + 1 + len(burst) + len(VALID_HOSTILE)

    expected_names = {*special, "socket.json", *(n for n, _ in burst)} | {
        n for n, _ in VALID_HOSTILE
    }
    valid = {n for n, d in burst if d == HAND_WRITTEN_VALID} | {n for n, _ in VALID_HOSTILE}
    not_regular = ["fifo.json", "symlink.json", "dangling.json", "loop.json", "directory.json"]
    problems: list[str] = []
    try:
        wait_for(
            lambda: set(os.listdir(layout.incoming)) == {".in-progress.json", "partial.json.tmp"},
            timeout=30,
            message="every candidate file to leave incoming/",
        )
        assert daemon.health()[0] == 200
        quarantined = {n for n in os.listdir(layout.quarantine) if not n.endswith(".reason")}
        assert quarantined == expected_names - valid
        reasons = {
            n: json.loads((layout.quarantine / f"{n}.reason").read_text())["reason"]
            for n in quarantined
        }
        assert set(reasons.values()) <= set(RejectReason), reasons
        for name in [*not_regular, "socket.json"]:
            if reasons[name] != "not_regular_file":
                problems.append(f"{name}: quarantined as {reasons[name]}, not not_regular_file")
        assert reasons["big.json"] == "too_large"
        assert os.path.islink(layout.quarantine / "symlink.json")
        assert (outside.read_bytes(), outside.stat().st_mtime_ns) == outside_before

        # The legal odd paths reached both recorder caches as exact strings.
        def pushed(path: str) -> int:
            return sum(
                1 for c in recorded(log) if path in c["stdin"].split("\n") or path in c["argv"]
            )

        wait_for(
            lambda: pushed(ODD_PATH) >= 2 and pushed(ODD_PATH_2) >= 2,
            timeout=30,
            message="odd paths pushed to the recorder caches",
        )
        for call in recorded(log):
            if call["argv"][:1] == ["push"]:
                assert call["argv"] == ["push", "recx"]
                assert all(oracle_store_path(p) for p in call["stdin"].split())
            else:
                assert call["argv"][:6] == [
                    "--extra-experimental-features",
                    "nix-command",
                    "copy",
                    "--to",
                    "file:///nonexistent",
                    "--",
                ]
                assert all(oracle_store_path(p) for p in call["argv"][6:])
        # Still healthy, and a real build is still pushed afterwards.
        [built] = build(workdir, 1, prefix="hcb-hostile")
        enqueue_all(daemon, tmp_path, [built], 1)
        wait_for(
            lambda: narinfo(fake_cachix / "team", built).is_file(),
            timeout=60,
            message="valid build pushed after the burst",
        )
        assert daemon.health()[0] == 200
        text = daemon.log()
        assert "Traceback" not in text, text[-3000:]
        assert "ingest pass failed" not in text
        assert "cannot quarantine" not in text
        assert (layout.incoming / ".in-progress.json").read_bytes() == b"{"
        assert_no_canary()
    finally:
        sock.close()
    assert problems == []


def test_daemon_quarantines_a_hard_link_and_leaves_its_other_name_alone(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A hard link in incoming/ (another name of a file outside the spool) is not a file a
    producer renamed in: the daemon must quarantine it, and never change the other name."""
    daemon = daemon_factory('[caches.c]\nbackend = "nix-copy"\nuri = "file:///nonexistent"\n')
    layout = SpoolLayout(tmp_path / "state" / "spool")
    outside = tmp_path / "outside-hardlink.json"
    outside.write_bytes(HAND_WRITTEN_VALID)
    before = (outside.read_bytes(), outside.stat().st_mtime_ns, outside.stat().st_mode)
    os.link(outside, layout.incoming / "hardlink.json")
    CASES["daemon_hard_link"] += 1
    wait_for(lambda: not os.listdir(layout.incoming), timeout=15, message="hard link handled")
    assert (outside.read_bytes(), outside.stat().st_mtime_ns, outside.stat().st_mode) == before
    assert daemon.health()[0] == 200
    reason_file = layout.quarantine / "hardlink.json.reason"
    assert reason_file.is_file(), (
        "a hard link to a file outside the spool was read and recorded instead of quarantined"
    )
    assert json.loads(reason_file.read_text())["reason"] in set(RejectReason)


POISON: list[tuple[str | bytes, bytes]] = [
    ("poison-build-id.json", hydra_doc(build=2**63)),
    ("poison-status.json", hydra_doc(buildStatus=2**64)),
    ("poison-timestamp.json", hydra_doc(timestamp=10**400)),
    (
        "poison-received-at.json",
        json.dumps({**json.loads(HAND_WRITTEN_VALID), "received_at": 10**400}).encode(),
    ),
    (b"poison-\xff\xfe-name.json", HAND_WRITTEN_VALID),
    ("P" * 252, b"{"),
]


@pytest.mark.parametrize(("name", "data"), POISON, ids=[f"poison-{i}" for i in range(len(POISON))])
def test_one_poison_file_neither_stalls_the_spool_nor_crashes_the_daemon(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    name: str | bytes,
    data: bytes,
) -> None:
    """A single file that parses but breaks later (an int too large for a double or for
    SQLite, a non-UTF-8 name, a name too long for its `.reason`) must be quarantined or
    recorded like any other, must not keep the valid files sorted after it in incoming/ on a
    rescan, and must not stop the daemon from starting."""
    daemon = daemon_factory(
        '[caches.c]\nbackend = "nix-copy"\nuri = "file:///nonexistent"\nexecutable = "/bin/true"\n',
        start=False,
    )
    layout = SpoolLayout(tmp_path / "state" / "spool")
    layout.ensure()
    put(layout, name, data)
    good = [f"zz-after-poison-{i}.json" for i in range(3)]
    for good_name in good:
        put(layout, good_name, HAND_WRITTEN_VALID)
    CASES["daemon_poison_files"] += 1

    def crashed() -> str:
        lines = [line for line in daemon.log().splitlines() if line.strip()]
        return f"daemon crashed at its initial spool scan: {lines[-1] if lines else '?'}"

    try:
        daemon.start(ready_timeout=20)
    except AssertionError:
        pytest.fail(f"{name!r} in incoming/: {crashed()}")
    try:
        wait_for(
            lambda: not os.listdir(os.fsencode(layout.incoming)) or daemon.proc_exited(),
            timeout=8,
            message=f"incoming/ to be emptied with {name!r} in it",
        )
    except AssertionError:
        left = os.listdir(os.fsencode(layout.incoming))
        errors = [ln for ln in daemon.log().splitlines() if "ERROR" in ln][-2:]
        pytest.fail(f"left in incoming/: {left}; daemon errors: {errors}")
    if daemon.proc_exited():
        pytest.fail(f"{name!r} in incoming/: {crashed()}")
    raw = os.fsencode(name)
    in_quarantine = os.path.lexists(os.path.join(os.fsencode(layout.quarantine), raw))
    has_reason = reason_path(layout.quarantine / os.fsdecode(raw)).exists()
    assert has_reason or not in_quarantine, f"{name!r} quarantined without a .reason file"
    assert daemon.health()[0] == 200
    assert "Traceback" not in daemon.log()
