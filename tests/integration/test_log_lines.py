"""The daemon's log tells the story: what each event queued where, why a push failed and
when it is tried again, and a log source that cannot be read (once, not every poll)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.daemonproc import DaemonProcess, enqueue_hydra, wait_for
from tests.nixhelpers import build, narinfo


def test_the_log_names_caches_paths_and_next_tries(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("tok\n")
    mirror = tmp_path / "mirror"
    missing = tmp_path / "missing.log"
    healthy, poison = build(workdir, 2)
    daemon = daemon_factory(
        "[push]\nmax_attempts = 5\nbackoff_initial_seconds = 30\nbackoff_max_seconds = 60\n"
        f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{token}"\n'
        f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{mirror}"\n',
        env={"FAKE_CACHIX_FAIL_PATHS": poison.name},
        extra_top=f'log_poll_seconds = 0.2\n[[log_sources]]\npath = "{missing}"\n',
    )
    assert enqueue_hydra(daemon, tmp_path, 1, healthy).returncode == 0
    wait_for(lambda: narinfo(mirror, healthy).is_file(), message="healthy path pushed")
    assert enqueue_hydra(daemon, tmp_path, 2, poison).returncode == 0
    wait_for(lambda: "next try in" in daemon.log(), message="failed push logged")
    time.sleep(1)  # several log-source polls
    log = daemon.log()

    queued = [line for line in log.splitlines() if "from hydra (build 1 " in line]
    assert len(queued) == 1 and queued[0].endswith("queued 1 path(s) for team, 1 for mirror")
    # The first failure of the poison path alone (depending on timing the cache may then go
    # down and come up again, which logs more lines of its own).
    failed = next(line for line in log.splitlines() if "push of 1 path(s) to team failed (" in line)
    assert "WARNING" in failed and f"paths: {poison.out}; next try in " in failed, failed
    assert "poison path" in failed  # the backend's own error
    unreadable = [line for line in log.splitlines() if "cannot read log source" in line]
    assert len(unreadable) == 1 and str(missing) in unreadable[0], unreadable
