"""Hostile Hydra payloads: what `enqueue-hydra` does with them (bridge.producers, in
process, then the daemon's ingest of the file) and the real command as a subprocess.
Shared properties and harness: tests/reliability/hostile.py."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bridge.events import (
    EventRejected,
)
from bridge.producers import PayloadRejected, record_hydra_payload
from bridge.spool import SpoolLayout
from exporter.vocabulary import RejectReason
from tests.integration.daemonproc import bridge
from tests.nixhelpers import hydra_payload
from tests.reliability.hostile import (
    CLI_EXAMPLES,
    EXAMPLES,
    SMALL_MAX_EVENT_BYTES,
    Harness,
    Violations,
    assert_no_canary,
    build_stub,
    check_backends_get_exact_paths,
    describe,
    hostile_module,
    many,
    new_report,
    oracle_store_path,
)
from tests.reliability.hostile_strategies import dump, hydra_payloads

CASES, REPORT = new_report()


@pytest.fixture(scope="module", autouse=True)
def _hostile_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with hostile_module(__file__, REPORT, tmp_path_factory.mktemp("hypothesis-home")):
        yield


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
    v = Violations("hydra_payload_in_process", REPORT)
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
    v = Violations("hydra_payload_cli", REPORT)
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
