"""Issue 11 finding 2: a forged Hydra payload cannot push a store path its build did not make."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.daemonproc import DaemonProcess, bridge, wait_for
from tests.nixhelpers import Built, build, hydra_payload, narinfo, offline_env

pytestmark = pytest.mark.nix


def add_secret_to_store(directory: Path) -> tuple[str, str]:
    """A store file holding a password, as a careless `builtins.toFile` would leave one."""
    password = f"hunter2-{uuid.uuid4().hex}"
    secret = directory / f"hcb-app-config-{uuid.uuid4().hex[:8]}"
    secret.write_text(f"db_password={password}\n")
    done = subprocess.run(
        ["nix-store", "--add", str(secret)],
        capture_output=True,
        text=True,
        env=offline_env(),
        check=True,
        timeout=60,
    )
    return done.stdout.strip(), password


def test_forged_hydra_payload_does_not_push_a_foreign_store_path(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path, workdir: Path
) -> None:
    cache = tmp_path / "cache"
    daemon = daemon_factory(
        f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{cache}"\n'
        '[[rules]]\njobs = ["trusted:main:*"]\ncaches = ["mirror"]\n'
    )
    genuine, victim = build(workdir, 2, prefix="hcb-forged")
    secret_path, password = add_secret_to_store(tmp_path)
    # The attacker names a real derivation of the trusted jobset and claims the secret as
    # its output: every field passes the syntax checks and the rule matches.
    forged = Built(victim.name, victim.drv, secret_path)
    for build_id, built in ((1, forged), (2, genuine)):
        payload = tmp_path / f"payload-{build_id}.json"
        payload.write_text(json.dumps(hydra_payload(build_id, built, project="trusted")))
        done = bridge(
            "enqueue-hydra",
            "--config",
            str(daemon.config),
            "--json-file",
            str(payload),
            env=daemon.env,
        )
        assert done.returncode == 0, done.stderr
    # The genuine payload, recorded after the forged one, is pushed.
    wait_for(lambda: narinfo(cache, genuine).is_file(), message="the genuine build pushed")

    secret_hash = Path(secret_path).name.split("-", 1)[0]
    assert not (cache / f"{secret_hash}.narinfo").exists()
    assert all(password not in p.read_text(errors="replace") for p in cache.rglob("*.narinfo"))
    wait_for(
        lambda: (
            daemon.metric("hydra_cachix_bridge_events_rejected_total", reason="foreign_outputs")
            >= 1
        ),
        message="the forged event counted as rejected",
    )
    quarantine = tmp_path / "state" / "spool" / "quarantine"
    reasons = [json.loads(p.read_text()) for p in quarantine.glob("*.reason")]
    assert [r["reason"] for r in reasons] == ["foreign_outputs"] * len(reasons) and reasons
    assert secret_path in reasons[0]["message"] and victim.drv in reasons[0]["message"]
    assert password not in daemon.log()
    # Nothing of it was queued: the one pushed path is the genuine build's (recorded once
    # nix copy has exited, after the narinfo appeared).
    wait_for(lambda: daemon.counts("mirror").get("pushed") == 1, message="the push recorded")
    assert daemon.counts("mirror") == {**daemon.counts("mirror"), "pushed": 1, "pending": 0}
    assert daemon.terminate() == 0
