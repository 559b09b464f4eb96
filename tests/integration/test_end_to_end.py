"""The whole bridge with real Nix: the sh hook as post-build-hook, Hydra payloads, rules."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.daemonproc import DaemonProcess, bridge, wait_for, write_hook
from tests.nixhelpers import build, hydra_payload, narinfo, offline_env

pytestmark = pytest.mark.nix


def test_hook_script_builds_arrive_in_file_cache(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path, workdir: Path
) -> None:
    cache = tmp_path / "binary-cache"
    daemon = daemon_factory(f'[caches.local]\nbackend = "nix-copy"\nuri = "file://{cache}"\n')
    hook = write_hook(daemon, tmp_path)

    built = build(workdir, 3, hook=hook, depends_on_first=True)

    for item in built:
        info = wait_for(
            lambda item=item: narinfo(cache, item).is_file() and narinfo(cache, item),
            message=f"narinfo of {item.out}",
        )
        text = info.read_text()
        assert f"StorePath: {item.out}" in text
        assert f"Deriver: {Path(item.drv).name}" in text
    # An event is counted after its rows are committed (a busy worker may push it first), a
    # push after `nix copy` wrote the narinfo and its rows are committed: wait for the counts.
    daemon.wait_metric("hydra_cachix_bridge_events_received_total", 3, source="hook")
    daemon.wait_metric("hydra_cachix_bridge_paths_pushed_total", 3, cache="local")
    # NAR sizes are counted in the background, about once a second.
    wait_for(
        lambda: daemon.metric("hydra_cachix_bridge_pushed_bytes_total", cache="local") > 0,
        message="pushed bytes counted",
    )
    counts = daemon.counts("local")
    assert counts["pushed"] == 3 and counts["pending"] == 0 and counts["dead"] == 0
    # The spool is empty again: every event file was removed after its rows were committed.
    assert list((tmp_path / "state" / "spool" / "incoming").iterdir()) == []
    assert daemon.terminate() == 0


def test_hydra_payloads_follow_job_and_status_rules(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    mirror = tmp_path / "mirror"
    token = tmp_path / "token"
    token.write_text("tok-integration-123\n")
    daemon = daemon_factory(
        f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{token}"\n'
        f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{mirror}"\n'
        '[[rules]]\njobs = ["proj:main:*"]\ncaches = ["team"]\n'
        '[[rules]]\njobs = ["other:*:*"]\ncaches = ["mirror"]\nbuild_statuses = [0, 6]\n',
        env={"FAKE_CACHIX_REQUIRE_TOKEN": "tok-integration-123"},
    )
    ok, failed, unmatched, other, excluded = build(workdir, 5)
    payloads = {
        "ok": hydra_payload(101, ok, project="proj", jobset="main"),
        "failed": hydra_payload(102, failed, project="proj", jobset="main", status=1),
        "unmatched": hydra_payload(103, unmatched, project="proj", jobset="dev"),
        "other": hydra_payload(104, other, project="other", jobset="x", status=6),
        "null-output": hydra_payload(
            105,
            excluded,
            project="proj",
            jobset="main",
            extra_outputs=[{"name": "dev", "path": None}],
        ),
    }
    env = dict(os.environ)
    for name, payload in [*payloads.items(), ("ok-again", payloads["ok"])]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(payload))
        env["HYDRA_JSON"] = str(path)
        done = bridge("enqueue-hydra", "--config", str(daemon.config), env=env)
        assert done.returncode == 0, done.stderr
        assert "recorded build" in done.stdout

    team = fake_cachix / "team"
    wait_for(
        lambda: narinfo(team, ok).is_file() and narinfo(team, excluded).is_file(),
        message="team pushes",
    )
    wait_for(lambda: narinfo(mirror, other).is_file(), message="mirror push")
    wait_for(
        lambda: daemon.metric("hydra_cachix_bridge_events_received_total", source="hydra") == 6,
        message="6 events",
    )
    # An ignored event is counted received first, ignored after; a push is counted after
    # cachix exited (writing its call line) and the rows were committed.
    ignored = "hydra_cachix_bridge_events_ignored_total"
    pushed = "hydra_cachix_bridge_paths_pushed_total"
    wait_for(
        lambda: (
            daemon.metric(ignored, reason="status_filtered") >= 1
            and daemon.metric(ignored, reason="no_rule") >= 1
        ),
        message="the ignored events counted",
    )
    wait_for(
        lambda: (
            daemon.metric(pushed, cache="team") >= 2 and daemon.metric(pushed, cache="mirror") >= 1
        ),
        message="the pushes counted",
    )
    time.sleep(0.5)  # give a wrong push the chance to happen before checking it did not
    assert not narinfo(team, failed).exists()
    assert not narinfo(team, unmatched).exists()
    assert not narinfo(mirror, ok).exists()
    assert not narinfo(team, other).exists()
    assert daemon.metric(ignored, reason="status_filtered") == 1
    assert daemon.metric(ignored, reason="no_rule") == 1
    # The same build notified twice (Hydra may split notifications) is pushed once.
    calls = [
        json.loads(line) for line in (tmp_path / "cachix-calls.jsonl").read_text().splitlines()
    ]
    pushed = [p for call in calls if call["exit"] == 0 for p in call["paths"]]
    assert pushed.count(ok.out) == 1
    assert all(call["had_token"] for call in calls)
    assert daemon.counts("team")["pushed"] == 2
    assert daemon.counts("mirror")["pushed"] == 1


def test_enqueue_hydra_with_daemon_down_is_picked_up_later(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path, workdir: Path
) -> None:
    cache = tmp_path / "cache"
    daemon = daemon_factory(f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{cache}"\n')
    assert daemon.terminate() == 0
    (item,) = build(workdir, 1)
    payload = tmp_path / "p.json"
    payload.write_text(json.dumps(hydra_payload(7, item)))
    done = bridge(
        "enqueue-hydra",
        "--config",
        str(daemon.config),
        "--json-file",
        str(payload),
        env=offline_env(),
    )
    assert done.returncode == 0, done.stderr
    daemon.start()
    wait_for(lambda: narinfo(cache, item).is_file(), message="push after restart")
