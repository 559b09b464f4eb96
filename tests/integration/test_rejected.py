"""A payload `enqueue-hydra` refuses is counted by the daemon once, logged once, and shown."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.daemonproc import DaemonProcess, bridge, mirror, wait_for

REJECTED = "hydra_cachix_bridge_events_rejected_total"


def refuse(daemon: DaemonProcess, payload: Path, content: str) -> None:
    """Run the real `enqueue-hydra` on a bad payload: it quarantines it and exits 1."""
    payload.write_text(content)
    done = bridge(
        "enqueue-hydra", "--config", str(daemon.config), "--json-file", str(payload), env=daemon.env
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "invalid Hydra payload" in done.stderr


def test_refused_payloads_are_counted_once_across_restarts(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    daemon = daemon_factory(mirror(tmp_path / "mirror"))
    before = daemon.metric(REJECTED)
    print(f"\nevents_rejected_total before: {before:.0f}")
    assert before == 0

    refuse(daemon, tmp_path / "payload.json", "{this is not json")
    # The spool's rescan (2 s here) finds the producer's .reason file.
    wait_for(lambda: daemon.metric(REJECTED, reason="invalid_json") == 1, 10, message="count")
    print(f"events_rejected_total after one refused payload: {daemon.metric(REJECTED):.0f}")
    status = daemon.status()["quarantine"]
    assert status["count"] == 1
    assert status["newest"][0]["reason"] == "invalid_json"
    saved = status["newest"][0]["quarantined_as"]
    # Counted first, logged after.
    wait_for(lambda: saved in daemon.log(), 10, message="the rejection logged")
    warnings = [line for line in daemon.log().splitlines() if saved in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "invalid_json" in warnings[0]

    # A file the daemon quarantines itself is counted once too, not again by the rescan.
    (tmp_path / "state" / "spool" / "incoming" / "garbage.json").write_bytes(b"\xff\xfe")
    wait_for(lambda: daemon.metric(REJECTED) == 2, 10, message="daemon's own quarantine")
    text = bridge("status", "--config", str(daemon.config), env=daemon.env)
    assert "quarantine: 2 rejected event file(s)" in text.stdout, text.stdout
    assert "invalid_json" in text.stdout and "garbage.json" in text.stdout

    # Restarting counts neither file again and logs neither again.
    assert daemon.terminate() == 0
    lines_before = daemon.log().count(saved)
    daemon.start()
    time.sleep(5)  # two rescans
    assert daemon.metric(REJECTED) == 0
    assert daemon.log().count(saved) == lines_before

    # A payload refused while the daemon is down is counted when it starts.
    assert daemon.terminate() == 0
    refuse(daemon, tmp_path / "payload2.json", '{"event": "buildFinished"}')
    daemon.start()
    wait_for(lambda: daemon.metric(REJECTED) == 1, 10, message="count after start")
    print(f"events_rejected_total after a restart and one more: {daemon.metric(REJECTED):.0f}")
    assert daemon.status()["quarantine"]["count"] == 3

    # Handled files removed by the operator are forgotten; nothing is counted for that.
    for entry in (tmp_path / "state" / "spool" / "quarantine").iterdir():
        entry.unlink()
    time.sleep(3)
    assert daemon.metric(REJECTED) == 1
    assert daemon.status()["quarantine"]["count"] == 0
