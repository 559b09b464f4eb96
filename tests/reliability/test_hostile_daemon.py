"""Hostile spool files into the real daemon (a subprocess): a burst of hostile files,
special files, a hard link, single poison files. Shared helpers: tests/reliability/hostile.py."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.events import (
    hook_envelope,
)
from bridge.spool import SpoolLayout, reason_path
from exporter.vocabulary import RejectReason
from tests.integration.daemonproc import DaemonProcess, enqueue_all, wait_for
from tests.nixhelpers import build, narinfo
from tests.reliability.hostile import (
    HAND_WRITTEN_VALID,
    C,
    assert_no_canary,
    hostile_module,
    hydra_doc,
    instantiated,
    make_recorder,
    new_report,
    oracle_store_path,
    recorded,
)

CASES, REPORT = new_report()


@pytest.fixture(scope="module", autouse=True)
def _hostile_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with hostile_module(__file__, REPORT, tmp_path_factory.mktemp("hypothesis-home")):
        yield


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
