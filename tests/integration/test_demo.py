"""The README's main job runs end to end."""

from __future__ import annotations

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
    narinfos = list((state / "binary-cache").glob("*.narinfo"))
    assert len(narinfos) == 4
    assert all("StorePath: /nix/store/" in n.read_text() for n in narinfos)
    # A second run builds new derivations and pushes them too.
    again = bridge(
        "demo", "--state-dir", str(state), "--builds", "1", env=offline_env(), timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert len(list((state / "binary-cache").glob("*.narinfo"))) == 6
