"""The root-run post-build-hook under attack by the users who share the spool (issue 11).

Tests run as root; the hook runs as root, as nix-daemon runs it; the attackers run as other
uids (fork + setuid): a member of the producers' group (like Hydra's RunCommand user) and
the daemon's own user, who owns the producers' directories. Each attack races the hook
while it records builds, then checks that nothing outside the hook's own files changed and
that every build's event is there, complete.

* finding 1: swap the directory the hook writes into for a link (renameat2 exchange);
* finding 3: plant links (to a directory, to a file) under the names the hook will use;
* finding 7: create the hook's directory before root does;
* the failure branch's `rm -f` after a failed write, while the directory is being swapped.

Set HCB_HOOK_BASELINE to a checkout of the old code (with `bridge/hookscript.py`) to run the
same attacks against that hook in the old layout (spool root owned by the daemon, `3770`,
the hook's private `hook-tmp/`); the tests then show which attack got through.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bridge.config import CacheConfig, Config, SpoolSettings, load_config
from bridge.events import decode_json, hook_envelope, hydra_envelope, parse_spool_document
from bridge.ingest import Ingestor
from bridge.intake import Intake
from bridge.matching import Rule
from bridge.spool import SpoolLayout, write_event
from bridge.statedb import StateDb
from bridge.store import NixStore
from exporter.metrics import BridgeMetrics
from exporter.vocabulary import RejectReason
from tests.asuser import NOBODY, run_as
from tests.nixhelpers import build, hydra_payload

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks need root and setuid")

REPO = Path(__file__).resolve().parents[2]
BASELINE = os.environ.get("HCB_HOOK_BASELINE")
DAEMON = (NOBODY, NOBODY)  # the daemon's user and the producers' group (nobody:nogroup)
MEMBER = 23456  # a producer in the group, e.g. Hydra's RunCommand user
HASH = "0123456789abcdfghijklmnpqrsvwxyz"
OUT = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-out"
RUNS = 60
ATTACKERS = {"group member": (MEMBER, NOBODY, (NOBODY,)), "daemon user": (*DAEMON, (NOBODY,))}

# Runs as the attacker (uid/gid set by Popen) until the stop file appears; prints counts.
ATTACK = r"""
import ctypes, errno, json, os, sys, time
mode, stop, *args = sys.argv[1:]
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
counts = {"succeeded": 0, "refused": 0}
def note(ok):
    counts["succeeded" if ok else "refused"] += 1
def exchange(a, b):
    ok = libc.renameat2(-100, a.encode(), -100, b.encode(), RENAME_EXCHANGE) == 0
    note(ok)
    return ok
def last_pid():
    with open("/proc/sys/kernel/ns_last_pid") as f:
        return int(f.read())
planted = set()
deadline = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline:
    if mode == "swap":
        # Finding 1 and the rm -f: exchange the hook's directory with a link of ours.
        target, own = args
        # A link beside the target if this user may write there (moving a directory to
        # another parent needs write access to it), else in the attacker's own directory.
        link = os.path.join(os.path.dirname(target), f".swap-{os.getuid()}")
        if not os.path.islink(link):
            try:
                os.symlink(own, link)
            except OSError:
                mine = os.path.join(os.path.dirname(stop), f"attacker-{os.getuid()}")
                link = os.path.join(mine, "swap")
                if not os.path.islink(link):
                    os.symlink(own, link)
        if exchange(link, target):
            time.sleep(0.0002)
            exchange(link, target)
    elif mode == "plant":
        # Finding 3: links under the names the next hooks will use, in every directory.
        hash_, victim_dir, *dirs = args
        base = last_pid()
        for pid in range(base + 1, base + 60):
            for d in dirs:
                name = os.path.join(d, f"hook-{pid}-{hash_}.json")
                if name in planted:
                    continue
                try:
                    os.symlink(victim_dir, name)  # a link to a root-only directory
                    planted.add(name)
                    note(True)
                except FileExistsError:
                    planted.add(name)
                except OSError:
                    note(False)
    elif mode == "mkdir":
        # Finding 7: make the hook's directory before root does.
        (target,) = args
        try:
            os.mkdir(target, 0o777)
            note(True)
        except FileExistsError:
            pass
        except OSError:
            note(False)
        time.sleep(0.001)
print(json.dumps(counts))
"""


@dataclass
class Setup:
    """A spool as a system install makes it, the hook generated as root, a victim."""

    root: Path
    config: Path
    layout: SpoolLayout
    hook: Path
    # Where the hook writes (the old hook: its hook-tmp/) and where its events end up.
    writes_in: Path
    events_in: Path
    victim_dir: Path
    victim_file: Path

    def victim_state(self) -> dict[str, bytes]:
        """Everything in the victim directory (root's files that no hook may touch)."""
        return {p.name: p.read_bytes() for p in sorted(self.victim_dir.iterdir())}


def _baseline_renderer() -> Callable[[SpoolLayout], str] | None:
    if not BASELINE:
        return None
    spec = importlib.util.spec_from_file_location(
        "baseline_hookscript", Path(BASELINE) / "bridge" / "hookscript.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    render: Callable[[SpoolLayout], str] = module.render_hook_script
    return render


def _bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


@pytest.fixture
def setup(shared_tmp: Path) -> Setup:
    root = shared_tmp
    config = root / "bridge.toml"
    config.write_text(
        f'state_dir = "{root}/var/lib/hcb"\nspool_dir = "{root}/var/spool/hcb"\n'
        "[spool]\ngroup_writable = true\n"
        f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{root}/cache"\n'
    )
    config.chmod(0o644)
    done = _bridge("init", "--config", str(config), "--user", "nobody", "--group", "nogroup")
    assert done.returncode == 0, done.stderr
    layout = SpoolLayout(root / "var/spool/hcb")
    hook = root / "post-build-hook"
    baseline = _baseline_renderer()
    if baseline is None:
        done = _bridge("hook-script", "--config", str(config))
        assert done.returncode == 0 and done.stderr == "", done.stderr
        hook.write_text(done.stdout)
        writes_in, events_in = layout.hook, layout.hook
    else:
        # The old layout: the daemon owned the spool root (3770), the hook made hook-tmp/.
        layout.hook.rmdir()
        os.chown(layout.root, *DAEMON)
        os.chmod(layout.root, 0o3770)
        hook.write_text(baseline(layout))
        writes_in, events_in = layout.root / "hook-tmp", layout.incoming
    hook.chmod(0o755)
    victim_dir = root / "root-only"
    victim_dir.mkdir(mode=0o700)
    victim_file = victim_dir / "secret"
    victim_file.write_text("root's own file\n")
    for attacker in (MEMBER, NOBODY):  # each attacker's own scratch directory
        own = root / f"attacker-{attacker}"
        own.mkdir()
        os.chown(own, attacker, NOBODY)
    return Setup(root, config, layout, hook, writes_in, events_in, victim_dir, victim_file)


@dataclass
class Racer:
    process: subprocess.Popen[str]
    stop: Path

    def finish(self) -> dict[str, int]:
        self.stop.touch()
        out, err = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, err
        counts: dict[str, int] = json.loads(out)
        return counts


def race(setup: Setup, who: str, mode: str, *args: str) -> Racer:
    """Start an attacker as another user, racing the hook runs that follow."""
    uid, gid, groups = ATTACKERS[who]
    stop = setup.root / f"stop-{mode}-{time.monotonic_ns()}"
    process = subprocess.Popen(
        # The system Python: the attacker may not read the project's virtualenv.
        ["/usr/bin/python3", "-c", ATTACK, mode, str(stop), *args],
        user=uid,
        group=gid,
        extra_groups=list(groups),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    time.sleep(0.3)  # let it start racing
    return Racer(process, stop)


def run_hooks(
    setup: Setup, count: int, *, limit_bytes: int | None = None
) -> list[subprocess.CompletedProcess[bytes]]:
    """Run the hook as root `count` times, one build each (distinct derivations)."""

    def limit() -> None:
        if limit_bytes is not None:  # a full disk: the write fails part way
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    runs = []
    for index in range(count):
        env = {"PATH": os.environ["PATH"], "DRV_PATH": drv(index), "OUT_PATHS": OUT}
        runs.append(
            subprocess.run(
                ["/bin/sh", str(setup.hook)],
                env=env,
                capture_output=True,
                timeout=30,
                check=False,
                preexec_fn=limit,
                cwd="/",
            )
        )
    return runs


def drv(index: int) -> str:
    return f"/nix/store/{HASH}-build{index}.drv"


def recorded(setup: Setup) -> list[str]:
    """The derivations of the complete hook events where the daemon will read them."""
    found = []
    for path in sorted(setup.events_in.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if data.endswith(b"\n") or BASELINE:
            event = parse_spool_document(decode_json(data), fallback_time=0.0)
            found.append(event.drv_path or "")
    return sorted(found)


def expected(count: int) -> list[str]:
    return sorted(drv(index) for index in range(count))


def outside_untouched(setup: Setup, before: dict[str, bytes]) -> None:
    assert setup.victim_state() == before, "root's files outside the hook's were touched"
    assert (setup.root / "stray").exists() is False


@pytest.fixture
def report_line(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """One line per attack for the issue's closing note (printed with -s)."""
    line: dict[str, Any] = {"attack": request.node.name, "hook": "baseline" if BASELINE else "new"}
    yield line
    print("ATTACK-RESULT " + json.dumps(line, sort_keys=True))


# ------------------------------------------------------------------------------------ attacks


@pytest.mark.parametrize("who", list(ATTACKERS))
def test_finding_1_swapping_the_hooks_directory_for_a_link(
    setup: Setup, who: str, report_line: dict[str, Any]
) -> None:
    before = setup.victim_state()
    if BASELINE:
        run_hooks(setup, 1)  # the old hook makes its hook-tmp/ on first use
        for leftover in setup.events_in.iterdir():
            leftover.unlink()
    racer = race(setup, who, "swap", str(setup.writes_in), str(setup.victim_dir))
    runs = run_hooks(setup, RUNS)
    counts = racer.finish()
    report_line.update(
        swaps=counts["succeeded"],
        refused=counts["refused"],
        victim_changed=setup.victim_state() != before,
    )
    report_line["events"] = len(recorded(setup))
    assert all(r.returncode == 0 for r in runs)
    outside_untouched(setup, before)
    assert counts["succeeded"] == 0
    assert recorded(setup) == expected(RUNS)
    assert all(r.stderr == b"" for r in runs)


@pytest.mark.parametrize("who", list(ATTACKERS))
def test_finding_3_links_planted_under_the_hooks_file_names(
    setup: Setup, who: str, report_line: dict[str, Any]
) -> None:
    before = setup.victim_state()
    dirs = [setup.layout.root, setup.layout.incoming, setup.layout.tmp, setup.writes_in]
    if BASELINE:
        run_hooks(setup, 1)
        for leftover in setup.events_in.iterdir():
            leftover.unlink()
    racer = race(setup, who, "plant", HASH, str(setup.victim_dir), *map(str, dirs))
    runs = run_hooks(setup, RUNS)
    counts = racer.finish()
    events = recorded(setup)
    report_line.update(
        planted_anywhere=counts["succeeded"],
        links_left_where_the_hook_writes=sum(p.is_symlink() for p in setup.writes_in.iterdir()),
        victim_changed=setup.victim_state() != before,
        events=len(events),
    )
    assert all(r.returncode == 0 for r in runs)
    outside_untouched(setup, before)
    assert events == expected(RUNS), f"{RUNS - len(events)} event(s) lost"
    # Nothing could be planted where the hook writes.
    if not BASELINE:
        assert not any(p.is_symlink() for p in setup.layout.hook.iterdir())


@pytest.mark.parametrize("who", list(ATTACKERS))
def test_finding_7_creating_the_hooks_directory_first(
    setup: Setup, who: str, report_line: dict[str, Any]
) -> None:
    before = setup.victim_state()
    if not BASELINE:
        setup.layout.hook.rmdir()  # as before tmpfiles or init made it
    racer = race(setup, who, "mkdir", str(setup.writes_in))
    time.sleep(0.2)
    counts = racer.finish()
    if not BASELINE:
        # Root's init (or tmpfiles) makes it, as on every boot.
        done = _bridge(
            "init", "--config", str(setup.config), "--user", "nobody", "--group", "nogroup"
        )
        assert done.returncode == 0, done.stderr
    runs = run_hooks(setup, RUNS)
    events = recorded(setup)
    report_line.update(created=counts["succeeded"], refused=counts["refused"], events=len(events))
    assert all(r.returncode == 0 for r in runs)
    outside_untouched(setup, before)
    assert counts["succeeded"] == 0
    assert events == expected(RUNS), f"{RUNS - len(events)} event(s) lost"
    assert os.lstat(setup.writes_in).st_uid == 0


@pytest.mark.parametrize("who", list(ATTACKERS))
def test_failure_branch_rm_with_the_directory_swapped(
    setup: Setup, who: str, report_line: dict[str, Any]
) -> None:
    """A write that fails (disk full) makes the hook remove its partial file: that removal
    must not follow a link to root's other files named like the hook's."""
    if BASELINE:
        run_hooks(setup, 1)
        for leftover in setup.events_in.iterdir():
            leftover.unlink()
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    for pid in range(last + 1, last + 4000):  # root's files, named as the hook names its own
        (setup.victim_dir / f"hook-{pid}-{HASH}.json").write_text("root's\n")
    before = setup.victim_state()
    racer = race(setup, who, "swap", str(setup.writes_in), str(setup.victim_dir))
    runs = run_hooks(setup, RUNS, limit_bytes=40)
    counts = racer.finish()
    after = setup.victim_state()
    report_line.update(
        swaps=counts["succeeded"],
        refused=counts["refused"],
        victim_files_removed=len(set(before) - set(after)),
    )
    assert all(r.returncode == 0 for r in runs)
    assert all(b"could not record" in r.stderr for r in runs)
    outside_untouched(setup, before)
    assert counts["succeeded"] == 0
    # The partial files are gone, nothing else is left.
    assert [p for p in setup.writes_in.iterdir()] == []
    # And with the disk free again, the next builds are recorded.
    assert run_hooks(setup, 3)[0].returncode == 0
    assert recorded(setup) == expected(3)


# --------------------------------------------------------------- what the daemon then accepts


def _metrics() -> BridgeMetrics:
    return BridgeMetrics(
        CollectorRegistry(),
        version="test",
        caches={"c": "nix-copy"},
    )


def _ingest_as_daemon(config_path: Path, passes: int = 1) -> dict[str, Any]:
    """Run ingest passes as the daemon's user; return what was recorded and rejected."""

    def work() -> dict[str, Any]:
        config = load_config(config_path)
        queue = StateDb(config.database_path)
        metrics = _metrics()
        intake = Intake(config.rules, metrics, _Clock())
        ingestor = Ingestor(config, queue, NixStore(), intake, _Clock())
        totals = {"recorded": 0, "quarantined": 0, "duplicates": 0, "deferred": 0}
        for _ in range(passes):
            stats = ingestor.ingest(ingestor.scan())
            for key in totals:
                totals[key] += getattr(stats, key)
        rows = queue.conn.execute("SELECT source, drv_path FROM events ORDER BY id").fetchall()
        rejected = {
            reason: metrics.registry.get_sample_value(
                "hydra_cachix_bridge_events_rejected_total", {"reason": reason}
            )
            for reason in RejectReason
        }
        queue.close()
        return {**totals, "events": rows, "rejected": {k: v for k, v in rejected.items() if v}}

    result: dict[str, Any] = run_as(*DAEMON, work)
    return result


class _Clock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.mark.skipif(bool(BASELINE), reason="the new channel only")
def test_the_daemon_reads_the_hooks_events_once_and_leaves_the_files(setup: Setup) -> None:
    runs = run_hooks(setup, 5)
    assert all(r.returncode == 0 and r.stderr == b"" for r in runs)
    first = _ingest_as_daemon(setup.config)
    assert first["recorded"] == 5 and first["quarantined"] == 0
    assert sorted(d for _, d in first["events"]) == expected(5)
    assert {s for s, _ in first["events"]} == {"hook"}
    # It cannot delete there (root's directory) and does not read them twice.
    assert len(list(setup.layout.hook.iterdir())) == 5
    again = _ingest_as_daemon(setup.config)
    assert again["recorded"] == 0 and len(again["events"]) == 5
    # A file the hook rewrites under the same name (a reused pid): read again; the same
    # content is the same event (a duplicate), other content a new one.
    [first_file] = sorted(setup.layout.hook.iterdir())[:1]
    time.sleep(0.01)
    first_file.write_bytes(first_file.read_bytes())
    same = _ingest_as_daemon(setup.config)
    assert (same["recorded"], same["duplicates"]) == (0, 1)
    first_file.write_bytes(first_file.read_bytes().replace(b"-out", b"-out2"))
    assert _ingest_as_daemon(setup.config)["recorded"] == 1
    # Files aged out by tmpfiles are forgotten.
    for path in setup.layout.hook.iterdir():
        path.unlink()
    _ingest_as_daemon(setup.config)
    rows = run_as(
        *DAEMON,
        lambda: (
            StateDb(load_config(setup.config).database_path)
            .conn.execute("SELECT COUNT(*) FROM hook_files")
            .fetchone()[0]
        ),
    )
    assert rows == 0


@pytest.mark.skipif(bool(BASELINE), reason="the new channel only")
def test_an_incomplete_hook_file_waits_then_is_rejected_without_being_lost(
    setup: Setup,
) -> None:
    partial = setup.layout.hook / "hook-1-partial.json"
    partial.write_bytes(json.dumps(hook_envelope(drv(1), OUT, 1.0)).encode())  # no newline
    os.chown(partial, 0, NOBODY)
    os.chmod(partial, 0o640)
    waiting = _ingest_as_daemon(setup.config)
    assert (waiting["deferred"], waiting["recorded"], waiting["quarantined"]) == (1, 0, 0)
    old = time.time() - 60
    os.utime(partial, (old, old))
    given_up = _ingest_as_daemon(setup.config)
    assert given_up["quarantined"] == 1 and given_up["rejected"] == {"incomplete_event": 1.0}
    copies = [p for p in setup.layout.quarantine.iterdir() if not p.name.endswith(".reason")]
    assert [p.read_bytes() for p in copies] == [partial.read_bytes()]
    assert partial.exists()  # root's file: tmpfiles ages it out
    # Completed later (the writer was only slow): read as a new file.
    with partial.open("ab") as handle:
        handle.write(b"\n")
    assert _ingest_as_daemon(setup.config)["recorded"] == 1


@pytest.mark.skipif(bool(BASELINE), reason="the new channel only")
def test_a_hook_event_forged_into_the_shared_spool_is_refused_and_counted(
    setup: Setup,
) -> None:
    """Finding 2's hook variant: a group member writes `kind: hook` into incoming/."""
    secret = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-db-password"
    layout = setup.layout

    def forge() -> str:
        return write_event(layout, "hook", hook_envelope("", secret, 1.0)).name

    name = run_as(MEMBER, NOBODY, forge, (NOBODY,))
    result = _ingest_as_daemon(setup.config)
    assert result["recorded"] == 0 and result["events"] == []
    assert result["rejected"] == {"untrusted_channel": 1.0}
    reason = json.loads((layout.quarantine / f"{name}.reason").read_text())
    assert reason["reason"] == "untrusted_channel"
    assert "hook directory" in reason["message"]


@pytest.mark.skipif(bool(BASELINE), reason="the new channel only")
def test_a_writer_cannot_suppress_anothers_event_by_recording_its_name_first(
    setup: Setup, workdir: Path
) -> None:
    """Finding 8: deduplication by file name let a pre-recorded name delete a real event."""
    layout = setup.layout
    name = "hydra-predictable.json"
    # Real derivations: a Hydra event's outputs must be outputs of its drvPath.
    built = dict(zip(("decoy", "real"), build(workdir, 2, prefix="hcb-dedup"), strict=True))

    def payload(build_id: int, job: str) -> bytes:
        doc = hydra_payload(build_id, built[job], project="p", jobset="j", job=job)
        return json.dumps(hydra_envelope(doc, 1.0)).encode()

    def put(data: bytes) -> None:
        (layout.tmp / name).write_bytes(data)
        os.rename(layout.tmp / name, layout.incoming / name)

    run_as(MEMBER, NOBODY, lambda: put(payload(1, "decoy")), (NOBODY,))
    assert _ingest_as_daemon(setup.config)["recorded"] == 1
    run_as(MEMBER + 1, NOBODY, lambda: put(payload(2, "real")), (NOBODY,))
    result = _ingest_as_daemon(setup.config)
    assert result["recorded"] == 1 and result["duplicates"] == 0
    assert [d for _, d in result["events"]] == [
        built["decoy"].drv,
        built["real"].drv,
    ]


def test_embedded_defaults_keep_one_owner(tmp_path: Path) -> None:
    """A private spool (one user runs everything) makes its own hook directory."""
    config = Config(
        state_dir=tmp_path / "state",
        spool_dir=tmp_path / "state" / "spool",
        caches=MappingProxyType({"c": CacheConfig("c", "nix-copy", uri="file:///x")}),
        rules=(Rule(caches=("c",)),),
        spool=SpoolSettings(),
    )
    layout = SpoolLayout.of(config)
    layout.ensure()
    assert os.lstat(layout.hook).st_uid == os.geteuid()
    assert os.stat(layout.hook).st_mode & 0o777 == 0o700
