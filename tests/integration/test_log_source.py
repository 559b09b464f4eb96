"""A hand-written hook that only appends to a log file, followed by the daemon."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.daemonproc import DaemonProcess, wait_for
from tests.nixhelpers import build, narinfo

pytestmark = pytest.mark.nix


def test_log_follower_pushes_paths_and_keeps_its_offset_across_restart_and_rotation(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path, workdir: Path
) -> None:
    cache = tmp_path / "cache"
    log = tmp_path / "built.log"
    hook = tmp_path / "hook.sh"
    # What people write today; Debian's Nix 2.8 leaves OUT_PATHS empty, so keep DRV_PATH too.
    hook.write_text(f'#!/bin/sh\necho "$DRV_PATH $OUT_PATHS" >> {log}\n')
    hook.chmod(0o755)
    daemon = daemon_factory(
        f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{cache}"\n',
        extra_top=f'log_poll_seconds = 0.1\n[[log_sources]]\npath = "{log}"\n'
        "resolve_derivations = true\n",
    )
    first = build(workdir, 2, hook=hook)
    for item in first:
        wait_for(lambda item=item: narinfo(cache, item).is_file(), message="first pushes")
    assert daemon.metric("hydra_cachix_bridge_events_received_total", source="log") >= 1

    # Restart: the saved offset means nothing is queued twice; new lines are read.
    assert daemon.terminate() == 0
    daemon.start()
    second = build(workdir, 1, hook=hook)
    wait_for(lambda: narinfo(cache, second[0]).is_file(), message="push after restart")
    assert daemon.metric("hydra_cachix_bridge_paths_enqueued_total", cache="c") == 1

    # Rotation by rename, then a fresh file.
    os.rename(log, tmp_path / "built.log.1")
    third = build(workdir, 1, hook=hook)
    wait_for(lambda: narinfo(cache, third[0]).is_file(), message="push after rotation")

    # Rotation by truncation.
    log.write_text("")
    fourth = build(workdir, 1, hook=hook)
    wait_for(lambda: narinfo(cache, fourth[0]).is_file(), message="push after truncation")
    # Marked pushed just after the copy lands in the cache.
    wait_for(lambda: daemon.counts("c").get("pushed") == 5, message="five marked pushed")
