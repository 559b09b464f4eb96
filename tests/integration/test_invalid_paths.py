"""A path garbage-collected before its push ends `skipped`, never `pushed`, on every backend."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.daemonproc import DaemonProcess, enqueue_all, wait_for
from tests.nixhelpers import build, narinfo

pytestmark = [pytest.mark.integration, pytest.mark.nix]


@pytest.mark.parametrize("backend", ["cachix", "nix-copy"])
def test_garbage_collected_path_is_skipped_on_every_backend(
    daemon_factory: Callable[..., DaemonProcess],
    fake_cachix: Path,
    tmp_path: Path,
    workdir: Path,
    backend: str,
) -> None:
    kept, gone = build(workdir, 2, prefix="hcb-gc")
    # Really garbage-collect one (nix-build --no-out-link left no root).
    subprocess.run(["nix-store", "--delete", gone.out], check=True, capture_output=True)
    assert not Path(gone.out).exists()
    if backend == "cachix":
        token = tmp_path / "token"
        token.write_text("t\n")
        cache_dir = fake_cachix / "c"
        body = f'[caches.c]\nbackend = "cachix"\nauth_token_file = "{token}"\n'
    else:
        cache_dir = tmp_path / "cache"
        body = f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{cache_dir}"\n'
    # Queued while the daemon is stopped, so that both paths go out in one batch.
    daemon = daemon_factory("[push]\nbatch_size = 8\n" + body)
    assert daemon.terminate() == 0
    enqueue_all(daemon, tmp_path, [kept, gone])
    daemon.start()
    wait_for(lambda: daemon.counts("c").get("skipped") == 1, message="skipped")
    wait_for(lambda: daemon.counts("c").get("pushed") == 1, message="pushed")
    time.sleep(1)
    counts = daemon.counts("c")
    assert counts["pending"] == counts["inflight"] == counts["dead"] == 0
    assert narinfo(cache_dir, kept).is_file()
    assert not narinfo(cache_dir, gone).exists()
    metric = daemon.metric
    assert metric("hydra_cachix_bridge_paths_pushed_total", cache="c") == 1
    assert metric("hydra_cachix_bridge_paths_skipped_total", cache="c", reason="invalid_path") == 1
    if backend == "cachix":
        # Upstream cachix exits 0 and only warns: one push, found out afterwards.
        assert metric("hydra_cachix_bridge_pushes_started_total", cache="c") == 1
    else:
        # nix copy fails on it: the failure reveals it, the rest goes again at once.
        assert metric("hydra_cachix_bridge_pushes_started_total", cache="c") == 2
    [entry] = [e for e in daemon.status()["caches"] if e["cache"] == "c"]
    assert entry["last_success_at"] is not None
