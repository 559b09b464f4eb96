"""Permissions: what the daemon, the hook and enqueue-hydra create, and what the daemon reads.

* The daemon creates its state dir, spool, quarantine and database privately (0700
  directories, a database file without access for others), or `3770` spool directories with
  `[spool] group_writable = true` — also under a careless umask.
* Quarantine files (`.reason` files, rejected payloads) are not world-readable; the quarantine
  directory is not world-accessible.
* The sh hook's event files in its root-only `hook/` have no access for others.
* Event files written by enqueue-hydra / enqueue-hook are not world-writable (or readable).
* The daemon never follows a symlink (a link to a readable file with valid content is
  quarantined, its target untouched and not recorded) and never reads anything that is not a
  regular file.
* Run as the unprivileged user `nobody`, the daemon quarantines a root-owned 0600 event file
  as `unreadable` instead of crashing.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.events import hook_envelope, hydra_envelope
from bridge.hookscript import render_hook_script
from bridge.spool import SpoolLayout
from exporter.vocabulary import RejectReason
from tests.integration.daemonproc import DaemonProcess, bridge, free_port, wait_for
from tests.nixhelpers import build, hydra_payload

REPO = Path(__file__).resolve().parents[2]
STORE_PATH = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hello"
VALID_EVENT = json.dumps(hook_envelope("", STORE_PATH, 1.0)).encode()
NOOP_CACHE = '[caches.c]\nbackend = "nix-copy"\nuri = "file:///nonexistent"\n'
NOOP_CACHE_PUSHING = NOOP_CACHE + 'executable = "/bin/true"\n'
CHECKED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    report_dir = os.environ.get("RELIABILITY_REPORT_DIR")
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "permissions.json").write_text(
            json.dumps(
                {"file": "tests/reliability/test_permissions.py", "checked": dict(CHECKED)},
                indent=2,
            )
        )


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """Children started inside inherit this umask (the daemon is started inside)."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def spool_dirs(spool: Path) -> list[Path]:
    return [spool, spool / "incoming", spool / "tmp", spool / "quarantine"]


# ----------------------------------------------------------------------------- what is created


@pytest.mark.parametrize("state_exists", [False, True], ids=["fresh-state", "state-dir-0755"])
def test_daemon_creates_state_spool_and_database_privately(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path, state_exists: bool
) -> None:
    """Under the common umask 022, outside systemd (no UMask=0027): 0700 directories, and a
    queue database (with its WAL and shared-memory files) that others cannot read. A state
    directory made beforehand with 0755 (mkdir by hand) must not expose the database."""
    state = tmp_path / "state"
    if state_exists:
        state.mkdir(mode=0o755)
        state.chmod(0o755)
    daemon = daemon_factory(NOOP_CACHE, start=False)
    with umask(0o022):
        daemon.start()
    (state / "spool" / "incoming" / "x.json").write_bytes(VALID_EVENT)
    wait_for(lambda: not os.listdir(state / "spool" / "incoming"), message="event ingested")
    if not state_exists:
        assert mode(state) == 0o700
    for directory in spool_dirs(state / "spool"):
        assert mode(directory) == 0o700, directory
    assert mode(state / "daemon.lock") == 0o600
    CHECKED["daemon_created_modes"] += 1
    files = sorted(state.glob("queue.sqlite3*"))
    assert {f.name for f in files} >= {"queue.sqlite3", "queue.sqlite3-wal"}
    exposed = {f.name: oct(mode(f)) for f in files if mode(f) & 0o007}
    assert exposed == {}, f"queue database files accessible to others: {exposed}"


def test_group_writable_spool_is_3770_and_the_hook_files_are_private(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """With group_writable the spool directories are setgid + sticky + 0770 (even under
    umask 000); the hook's directory is root's (made by init or tmpfiles, never by the
    daemon or the hook), and the hook's event files have no access for others, whatever the
    caller's umask."""
    daemon = daemon_factory("group_writable = true\n" + NOOP_CACHE, start=False)
    with umask(0o000):
        daemon.start()
    spool = tmp_path / "state" / "spool"
    for directory in spool_dirs(spool):
        assert mode(directory) == 0o3770, (directory, oct(mode(directory)))
    assert mode(tmp_path / "state") == 0o700
    CHECKED["group_writable_modes"] += 1
    # The hook, run as root by nix-daemon, which may have any umask.
    hook = tmp_path / "hook"
    hook.write_text(render_hook_script(SpoolLayout(spool)))
    hook.chmod(0o755)
    daemon.terminate()  # keep the hook's file in incoming/ to look at it
    done = subprocess.run(
        ["/bin/sh", "-c", f'umask 000; exec /bin/sh "{hook}"'],
        env={"PATH": os.environ["PATH"], "DRV_PATH": "", "OUT_PATHS": STORE_PATH},
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0
    # The daemon does not make the hook's directory of a shared spool: root does.
    assert b"could not record" in done.stderr and not (spool / "hook").exists()
    (spool / "hook").mkdir()
    os.chmod(spool / "hook", 0o2750)  # as init and tmpfiles make it
    done = subprocess.run(
        ["/bin/sh", "-c", f'umask 000; exec /bin/sh "{hook}"'],
        env={"PATH": os.environ["PATH"], "DRV_PATH": "", "OUT_PATHS": STORE_PATH},
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0 and done.stderr == b""
    assert list((spool / "incoming").iterdir()) == []
    [event] = list((spool / "hook").iterdir())
    assert mode(event) & 0o007 == 0, oct(mode(event))
    assert os.lstat(event).st_gid == os.lstat(spool / "hook").st_gid
    CHECKED["hook_tmp_and_hook_event_modes"] += 1


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_event_files_from_enqueue_commands_are_not_world_writable(
    tmp_path: Path, mask: int
) -> None:
    spool = SpoolLayout(tmp_path / "state" / "spool")
    spool.ensure(group_writable=True)
    spool.hook.mkdir(mode=0o750)  # root's, as init makes it: enqueue-hook writes there
    config = tmp_path / "bridge.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n' + NOOP_CACHE)
    payload = tmp_path / "payload.json"
    payload.write_text(
        json.dumps(
            {
                "build": 1,
                "project": "p",
                "jobset": "j",
                "job": "x",
                "drvPath": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv",
                "buildStatus": 0,
                "outputs": [{"name": "out", "path": STORE_PATH}],
            }
        )
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    env = dict(os.environ, DRV_PATH="", OUT_PATHS=STORE_PATH)
    for args, code in (
        (["enqueue-hydra", "--json-file", str(payload)], 0),
        (["enqueue-hook"], 0),
        (["enqueue-hydra", "--json-file", str(bad)], 1),
    ):
        with umask(mask):
            done = bridge(*args, "--config", str(config), env=env)
        assert done.returncode == code, done.stderr
    written = [*spool.incoming.iterdir(), *spool.hook.iterdir()]
    assert len(written) == 2 and len(list(spool.hook.iterdir())) == 1
    for path in written:
        assert mode(path) & 0o006 == 0, (path.name, oct(mode(path)))
    # The rejected payload went to quarantine with its .reason: neither is world-readable.
    saved = list(spool.quarantine.iterdir())
    assert len(saved) == 2
    for path in saved:
        assert mode(path) & 0o007 == 0, (path.name, oct(mode(path)))
    CHECKED["enqueue_command_file_modes"] += 1


def test_quarantine_is_not_world_readable(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """Under umask 000, the daemon's .reason files have no access for others, and the
    quarantine directory is not world-accessible (so a producer's own 0644/0666 file moved
    there is not readable by others either)."""
    daemon = daemon_factory("group_writable = true\n" + NOOP_CACHE, start=False)
    with umask(0o000):
        daemon.start()
    spool = tmp_path / "state" / "spool"
    for index, mask in enumerate((0o644, 0o666, 0o600)):
        path = spool / "tmp" / f"bad-{index}"
        path.write_bytes(b"{not json")
        path.chmod(mask)
        os.utime(path, (1.0, 1.0))  # long settled: quarantined at once
        path.rename(spool / "incoming" / f"bad-{index}.json")
    wait_for(
        lambda: len(list((spool / "quarantine").glob("*.reason"))) == 3,
        message="three files quarantined",
    )
    quarantine = spool / "quarantine"
    assert mode(quarantine) & 0o007 == 0, oct(mode(quarantine))
    for reason in quarantine.glob("*.reason"):
        assert mode(reason) & 0o007 == 0, (reason.name, oct(mode(reason)))
        assert json.loads(reason.read_text())["reason"] == "invalid_json"
    CHECKED["quarantine_modes"] += 1


# ----------------------------------------------------------------------------- what is read


def test_daemon_never_follows_symlinks_or_reads_non_regular_files(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    daemon = daemon_factory(NOOP_CACHE_PUSHING)
    incoming = tmp_path / "state" / "spool" / "incoming"
    quarantine = tmp_path / "state" / "spool" / "quarantine"
    target = tmp_path / "readable-valid-event.json"
    target.write_bytes(VALID_EVENT)
    target.chmod(0o644)
    before = os.stat(target)
    fifo = tmp_path / "outside-fifo"
    os.mkfifo(fifo)
    outside_dir = tmp_path / "outside-dir"
    outside_dir.mkdir()
    os.symlink(target, incoming / "link-to-valid.json")
    os.symlink(fifo, incoming / "link-to-fifo.json")
    os.symlink(outside_dir, incoming / "link-to-dir.json")
    os.symlink("/dev/zero", incoming / "link-to-device.json")
    os.mkfifo(incoming / "fifo.json")
    (incoming / "dir.json").mkdir()
    os.mknod(incoming / "null-device.json", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(incoming / "socket.json"))
    names = [
        "link-to-valid.json",
        "link-to-fifo.json",
        "link-to-dir.json",
        "link-to-device.json",
        "fifo.json",
        "dir.json",
        "null-device.json",
        "socket.json",
    ]
    try:
        wait_for(lambda: not os.listdir(incoming), timeout=20, message="special files quarantined")
    finally:
        sock.close()
    reasons = {
        name: json.loads((quarantine / f"{name}.reason").read_text())["reason"] for name in names
    }
    assert set(reasons.values()) <= set(RejectReason)
    for name in names[:-1]:  # the socket's label is checked in test_hostile_daemon.py
        assert reasons[name] == "not_regular_file", (name, reasons[name])
    # The links were moved, not followed: the target is untouched and was never recorded.
    assert os.path.islink(quarantine / "link-to-valid.json")
    assert os.readlink(quarantine / "link-to-valid.json") == str(target)
    after = os.stat(target)
    assert target.read_bytes() == VALID_EVENT
    assert (after.st_mtime_ns, after.st_ctime_ns, after.st_ino, after.st_mode) == (
        before.st_mtime_ns,
        before.st_ctime_ns,
        before.st_ino,
        before.st_mode,
    )
    assert daemon.metric("hydra_cachix_bridge_events_received_total") == 0
    assert daemon.counts("c") == {"pending": 0, "inflight": 0, "pushed": 0, "skipped": 0, "dead": 0}
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and outside_dir.is_dir()
    assert daemon.health()[0] == 200
    assert "Traceback" not in daemon.log()
    CHECKED["special_files_refused"] += len(names)


# ----------------------------------------------------------------------------- as nobody


class NobodyDaemon(DaemonProcess):
    """The daemon run as `nobody` with the system Python (pytest's Python lives under /root,
    which nobody cannot enter) and copies of its three dependencies."""

    def __init__(self, config: Path, port: int, log_file: Path, pylib: Path) -> None:
        super().__init__(
            config,
            port,
            log_file,
            env={
                "PATH": os.environ["PATH"],
                "PYTHONPATH": f"{REPO}{os.pathsep}{pylib}",
                "HOME": str(config.parent),
                "LC_ALL": "C.UTF-8",
            },
        )

    def start(self, ready_timeout: float = 30.0) -> NobodyDaemon:
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "setpriv",
                    "--reuid=nobody",
                    "--regid=nogroup",
                    "--clear-groups",
                    "/usr/bin/python3",
                    "-m",
                    "bridge",
                    "run",
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.config.parent,
                start_new_session=True,
            )
        wait_for(
            lambda: self.health()[0] == 200 or self.proc_exited(),
            ready_timeout,
            message="daemon (as nobody) /healthz",
        )
        if self.proc_exited():
            raise AssertionError(f"daemon exited early:\n{self.log()}")
        return self


@pytest.fixture
def nobody_base() -> Iterator[Path]:
    """A directory outside /root that nobody can enter, with the dependencies copied in."""
    if shutil.which("setpriv") is None or not Path("/usr/bin/python3").exists():
        pytest.skip("needs setpriv and /usr/bin/python3 to run the daemon as nobody")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    base = Path(tempfile.mkdtemp(prefix="hcb-nobody-"))
    base.chmod(0o755)
    pylib = base / "pylib"
    pylib.mkdir()
    import click
    import prometheus_client
    import watchdog

    for module in (click, prometheus_client, watchdog):
        source = Path(module.__file__ or "").parent
        shutil.copytree(source, pylib / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [pylib, *pylib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    probe = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            "import bridge.daemon, bridge.cli",
        ],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": f"{REPO}{os.pathsep}{pylib}"},
        cwd=base,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        shutil.rmtree(base)
        pytest.skip(f"cannot import the bridge as nobody: {probe.stderr.strip()[-300:]}")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def valid_hydra_event(directory: Path) -> bytes:
    """A Hydra event the daemon accepts: its output is an output of its drvPath, for real."""
    [built] = build(directory, 1, prefix="hcb-perm")
    return json.dumps(
        hydra_envelope(hydra_payload(1, built, project="p", jobset="j"), 1.0)
    ).encode()


def test_daemon_as_nobody_quarantines_a_root_only_event_file_as_unreadable(
    nobody_base: Path, workdir: Path
) -> None:
    nobody = pwd.getpwnam("nobody")
    state = nobody_base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    port = free_port()
    config = nobody_base / "bridge.toml"
    config.write_text(
        f'state_dir = "{state}"\nlog_level = "debug"\n'
        f"[metrics]\nport = {port}\n[spool]\nrescan_seconds = 1\ngroup_writable = true\n"
        + NOOP_CACHE_PUSHING
    )
    daemon = NobodyDaemon(config, port, nobody_base / "daemon.log", nobody_base / "pylib")
    try:
        daemon.start()
        assert daemon.proc is not None
        uids = Path(f"/proc/{daemon.proc.pid}/status").read_text().split("\nUid:")[1].split()
        assert {int(u) for u in uids[:4]} == {nobody.pw_uid}, uids
        incoming = state / "spool" / "incoming"
        quarantine = state / "spool" / "quarantine"
        assert os.stat(incoming).st_uid == nobody.pw_uid
        assert mode(incoming) == 0o3770
        # Root's files, as the root-run post-build-hook could leave them.
        for name, data in (("root-only.json", VALID_EVENT), ("root-only-bad.json", b"{")):
            path = state / "spool" / "tmp" / name
            path.write_bytes(data)
            path.chmod(0o600)
            path.rename(incoming / name)
        # And one the daemon can read (a Hydra event: hook events do not count from a
        # shared incoming/).
        readable = state / "spool" / "tmp" / "readable.json"
        readable.write_bytes(valid_hydra_event(workdir))
        readable.chmod(0o644)
        readable.rename(incoming / "readable.json")
        wait_for(lambda: not os.listdir(incoming), timeout=20, message="incoming/ emptied")
        # Counted after the move out of incoming/.
        wait_for(
            lambda: daemon.metric("hydra_cachix_bridge_events_rejected_total", reason="unreadable")
            == 2,
            timeout=10,
            message="both counted",
        )
        for name, data in (("root-only.json", VALID_EVENT), ("root-only-bad.json", b"{")):
            record = json.loads((quarantine / f"{name}.reason").read_text())
            assert record["reason"] == "unreadable", record
            moved = quarantine / name
            assert moved.read_bytes() == data
            assert os.stat(moved).st_uid == 0 and mode(moved) == 0o600
            assert os.stat(quarantine / f"{name}.reason").st_uid == nobody.pw_uid
        assert daemon.metric("hydra_cachix_bridge_events_rejected_total", reason="unreadable") == 2
        assert daemon.metric("hydra_cachix_bridge_events_received_total", source="hydra") == 1
        assert daemon.health()[0] == 200
        assert not daemon.proc_exited()
        assert "Traceback" not in daemon.log()
        CHECKED["nobody_unreadable_quarantined"] += 2
    finally:
        daemon.cleanup()
