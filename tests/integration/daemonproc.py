"""Run the real daemon as a subprocess and talk to it over HTTP, the spool and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.nixhelpers import Built, hydra_payload


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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

    def start(self, ready_timeout: float = 30.0) -> DaemonProcess:
        """Start and wait until /healthz answers 200."""
        log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        wait_for(
            lambda: self.health()[0] == 200 or self.proc_exited(),
            ready_timeout,
            message="daemon /healthz",
        )
        if self.proc_exited():
            raise AssertionError(f"daemon exited early:\n{self.log()}")
        return self

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

    def metrics_text(self) -> str:
        """The raw /metrics exposition."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
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

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

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
