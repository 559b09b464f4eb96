"""Run the real daemon as a subprocess and talk to it over HTTP, the spool and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bridge.config import load_config
from bridge.events import Event
from bridge.spool import SpoolLayout
from bridge.statedb import StateDb
from tests.nixhelpers import Built, hydra_payload, offline_env

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fake_path(index: int, name: str = "bench") -> str:
    """A syntactically valid store path that need not exist (for instant backends)."""
    digits = []
    value = index
    for _ in range(32):
        digits.append(NIX_BASE32[value % 32])
        value //= 32
    return f"/nix/store/{''.join(digits)}-{name}-{index}"


def bridge(
    *args: str,
    env: dict[str, str] | None = None,
    input_data: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m bridge ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        env=env,
        input=input_data,
        timeout=timeout,
        check=False,
    )


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Poll until condition() is truthy; fail with message after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def enqueue_hydra(
    daemon: DaemonProcess, directory: Path, build_id: int, built: Built, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """Record a Hydra payload for a built path with the real `enqueue-hydra` command."""
    payload = directory / f"payload-{build_id}.json"
    payload.write_text(json.dumps(hydra_payload(build_id, built)))
    return bridge(
        "enqueue-hydra",
        "--config",
        str(daemon.config),
        "--json-file",
        str(payload),
        env=daemon.env,
        timeout=timeout,
    )


def enqueue_all(
    daemon: DaemonProcess, directory: Path, items: list[Built], first_id: int = 1
) -> None:
    """One Hydra payload per built path, each recorded successfully."""
    for offset, item in enumerate(items):
        done = enqueue_hydra(daemon, directory, first_id + offset, item)
        assert done.returncode == 0, done.stderr


def write_hook(daemon: DaemonProcess, directory: Path) -> Path:
    """The real generated post-build-hook for the daemon's config, as an executable file."""
    done = bridge("hook-script", "--config", str(daemon.config), env=daemon.env)
    assert done.returncode == 0, done.stderr
    hook = directory / "post-build-hook.sh"
    hook.write_text(done.stdout)
    hook.chmod(0o755)
    return hook


def mirror(cache: Path) -> str:
    """Config of a nix-copy cache named `mirror` at a file:// directory."""
    return f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{cache}"\n'


def configured(
    directory: Path,
    body: str,
    *,
    env: dict[str, str] | None = None,
    log_level: str = "warning",
    metrics: bool = True,
) -> DaemonProcess:
    """A daemon (not started) whose config in directory keeps its state there.

    The config is directory/bridge.toml: `state_dir` under directory, the log level, metrics
    on a free port (or off: then start it with notify_ready), then body; the environment is
    the offline one plus env.
    """
    port = free_port()
    served = f"port = {port}" if metrics else "enabled = false"
    config = directory / "bridge.toml"
    config.write_text(
        f'state_dir = "{directory / "state"}"\nlog_level = "{log_level}"\n'
        f"[metrics]\n{served}\n{body}"
    )
    return DaemonProcess(config, port, directory / "daemon.log", env=offline_env(env))


@contextlib.contextmanager
def running(
    daemon: DaemonProcess, ready_timeout: float = 30.0, *, notify_ready: bool = False
) -> Iterator[DaemonProcess]:
    """Start the daemon, yield it, and always stop it (and whatever it left in its group)."""
    try:
        yield daemon.start(ready_timeout, notify_ready=notify_ready)
    finally:
        daemon.stop()


class DaemonProcess:
    """`hydra-cachix-bridge run` in its own process group, logging to a file."""

    def __init__(
        self, config: Path, port: int, log_file: Path, env: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.port = port
        self.log_file = log_file
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None
        # Seconds from the start to READY=1 (only measured with notify_ready).
        self.ready_after = 0.0

    def start(self, ready_timeout: float = 30.0, *, notify_ready: bool = False) -> DaemonProcess:
        """Start and wait until /healthz answers 200.

        With notify_ready, wait instead for READY=1 on a notify socket of our own (sent after
        the first spool scan, also with metrics off) and note how long that took.
        """
        if not notify_ready:
            self._spawn(self.env)
            wait_for(
                lambda: self.health()[0] == 200 or self.proc_exited(),
                ready_timeout,
                message="daemon /healthz",
            )
        else:
            # A short directory of its own: a socket path may have at most 107 bytes.
            directory = Path(tempfile.mkdtemp(prefix="hcb-notify-"))
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    sock.bind(str(directory / "notify"))
                    started = time.monotonic()
                    self._spawn(dict(self.env, NOTIFY_SOCKET=str(directory / "notify")))
                    self._await_ready(sock, started + ready_timeout)
                    self.ready_after = time.monotonic() - started
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        if self.proc_exited():
            raise AssertionError(f"daemon exited early:\n{self.log()}")
        return self

    def _spawn(self, env: dict[str, str]) -> None:
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()

    def _await_ready(self, sock: socket.socket, deadline: float) -> None:
        """Read notifications until READY=1, the daemon's exit or the deadline."""
        sock.settimeout(0.2)
        while not self.proc_exited():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the daemon's READY=1")
            try:
                message = sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in message.split(b"\n"):
                return

    def proc_exited(self) -> bool:
        """True once the daemon process has ended."""
        return self.proc is not None and self.proc.poll() is not None

    def health(self) -> tuple[int, str]:
        """Status code and body of /healthz (0 when not answering)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metrics_text(self, timeout: float = 5.0) -> str:
        """The raw /metrics exposition."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of samples called name whose labels include the given ones."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def wait_metric(self, name: str, value: float, timeout: float = 30.0, **labels: str) -> None:
        """Wait until metric(name, **labels) reads value.

        The daemon counts after it commits (and logs after it counts): a test that saw a
        row, a file or an earlier metric waits here before it reads a count.
        """
        last = [float("nan")]

        def reads_value() -> bool:
            last[0] = self.metric(name, **labels)
            return last[0] == value

        try:
            wait_for(reads_value, timeout, message=f"{name}{labels or ''} == {value:g}")
        except AssertionError as exc:
            raise AssertionError(f"{exc} (it read {last[0]:g})") from None

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    @property
    def spool(self) -> SpoolLayout:
        """The daemon's spool, from its config."""
        return SpoolLayout(load_config(self.config).spool_dir)

    @property
    def database(self) -> Path:
        """The daemon's state database, from its config."""
        return load_config(self.config).database_path

    def prefill(self, count: int, *, cache: str, due_in: float = 0.0) -> None:
        """Queue `count` pending items of made-up paths straight into the state database.

        For a daemon about to start with a large queue; with due_in the items are not due
        for that many seconds, so the queue holds still.
        """
        queue = StateDb(self.database)
        now = time.time()
        try:
            chunk = 10_000
            for start in range(0, count, chunk):
                paths = tuple(fake_path(i) for i in range(start, min(count, start + chunk)))
                with queue.transaction():
                    queue.record_event(
                        Event("hook", now, paths),
                        spool_name=None,
                        outcome="matched",
                        targets=[(cache, p) for p in paths],
                        now=now,
                    )
            if due_in:
                with queue.transaction():
                    queue.conn.execute("UPDATE items SET next_attempt_at = ?", (now + due_in,))
        finally:
            queue.close()

    def items_in(self, *states: str) -> int:
        """Items in any of the given states, read straight from the state database.

        A read-only look, cheap enough to poll while the daemon works (no CLI start, no
        request to the daemon).
        """
        marks = ", ".join("?" for _ in states)
        with contextlib.closing(
            sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30)
        ) as conn:
            row = conn.execute(
                f"SELECT COUNT(*) FROM items WHERE state IN ({marks})", states
            ).fetchone()
            return int(row[0])

    def peak_rss_mib(self) -> float:
        """Peak resident memory (VmHWM) of the daemon process in MiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmHWM for the daemon (pid {self.proc.pid})")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the daemon (only the daemon process, as a crash would)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 120.0) -> None:
        """SIGTERM and wait (SIGKILL after timeout), then kill what is left of its group."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self.cleanup()

    def cleanup(self) -> None:
        """Kill whatever is left of the daemon's process group."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def status(self) -> dict[str, Any]:
        """`status --json` as a document."""
        done = bridge("status", "--json", "--config", str(self.config), env=self.env)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def counts(self, cache: str) -> dict[str, int]:
        """Item counts per state for one cache."""
        for entry in self.status()["caches"]:
            if entry["cache"] == cache:
                return dict(entry["counts"])
        return {}
