"""The README's main job runs end to end."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from tests.integration.daemonproc import bridge
from tests.nixhelpers import offline_env

pytestmark = pytest.mark.nix


def test_demo_pushes_everything_it_builds(tmp_path: Path) -> None:
    state = tmp_path / "demo-state"
    done = bridge(
        "demo", "--state-dir", str(state), "--builds", "3", env=offline_env(), timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo finished: every built path is in the binary cache" in done.stdout
    assert "5 recorded (4 from the hook, 1 from Hydra's RunCommand)" in done.stdout
    # Every step says what it does as it goes: each build, then push progress per cache.
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("building ")][1:] == [
        f"building {k}/4" for k in range(1, 5)
    ], done.stdout
    assert "pushing to local: 4/4 path(s) done" in lines, done.stdout
    # The closing hint names a command that works exactly as printed.
    hint = lines[-1]
    assert hint.startswith("next: `"), hint
    printed = hint.split("`")[1]
    assert printed.endswith(f"status --config {state / 'demo.toml'}"), hint
    status = subprocess.run(
        shlex.split(printed), capture_output=True, text=True, timeout=60, check=False
    )
    assert status.returncode == 0, status.stderr
    assert "local" in status.stdout
    narinfos = list((state / "binary-cache").glob("*.narinfo"))
    assert len(narinfos) == 4
    assert all("StorePath: /nix/store/" in n.read_text() for n in narinfos)
    # A second run builds new derivations and pushes them too.
    again = bridge(
        "demo", "--state-dir", str(state), "--builds", "1", env=offline_env(), timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert len(list((state / "binary-cache").glob("*.narinfo"))) == 6
