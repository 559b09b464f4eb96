"""Hostile spool files through the daemon's real `Ingestor`: arbitrary bytes, arbitrary
JSON, mutated envelopes, hostile names, hand-written edge cases, a 50 MB file, names that
try to forge log lines. Shared properties and harness: tests/reliability/hostile.py."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.events import (
    hook_envelope,
    hydra_envelope,
)
from bridge.spool import reason_path
from tests.reliability.hostile import (
    CANARY,
    EXAMPLES,
    HAND_WRITTEN_VALID,
    C,
    Harness,
    Violations,
    assert_no_canary,
    check_backends_get_exact_paths,
    check_ingest,
    hostile_module,
    hydra_doc,
    many,
    new_report,
)
from tests.reliability.hostile_strategies import (
    BIG_NUMBERS,
    dump,
    good_drvs,
    good_paths,
    hostile_paths,
    hydra_payloads,
    json_values,
)

CASES, REPORT = new_report()


@pytest.fixture(scope="module", autouse=True)
def _hostile_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with hostile_module(__file__, REPORT, tmp_path_factory.mktemp("hypothesis-home")):
        yield


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


# ============================================================================ (b) spool files


def test_raw_spool_files_through_the_ingestor(tmp_path: Path) -> None:
    """(b) Arbitrary bytes, arbitrary JSON, mutated envelopes, hostile names: every file is
    recorded (valid store paths only) or quarantined with a reason; nothing stays behind."""
    h = Harness(tmp_path)
    v = Violations("spool_file", REPORT)
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
    v = Violations("hand_written", REPORT)
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
