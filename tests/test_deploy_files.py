"""Deployment files: every .nix parses, the contrib unit is hardened, tmpfiles match the daemon."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "systemd" / "hydra-cachix-bridge.service"
NIX_FILES = sorted(p for p in ROOT.rglob("*.nix") if ".venv" not in p.parts)


def test_there_are_nix_files() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in NIX_FILES}
    assert {
        "flake.nix",
        "default.nix",
        "nixos/module.nix",
        "nixos/package.nix",
        "nixos/tests/hydra-cachix-bridge.nix",
        "nixos/integrations/hydra.nix",
        "nixos/integrations/post-build-hook.nix",
        "nixos/integrations/prometheus.nix",
        "nixos/integrations/grafana.nix",
        "tests/nixos-eval/eval.nix",
    } <= names


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_nix_file_parses(path: Path) -> None:
    binary = shutil.which("nix-instantiate")
    assert binary, "nix-instantiate missing: the test command installs nix-bin"
    done = subprocess.run(
        [binary, "--parse", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_contrib_unit_exposure_is_at_most_2_5() -> None:
    binary = shutil.which("systemd-analyze")
    assert binary, "systemd-analyze missing"
    done = subprocess.run(
        [binary, "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.5, done.stdout


def test_contrib_unit_is_a_notify_service_with_watchdog_and_the_reference_hardening() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "Group=hydra",
        "LimitNOFILE=16384\n",
        "TasksMax=4096\n",
        "MemoryMax=8G\n",
    ):
        assert line in text, line
    # cachix is a GHC program whose runtime mprotect()s FFI callback code executable.
    assert "MemoryDenyWriteExecute=yes" not in text


def test_tmpfiles_create_every_spool_directory_with_the_daemons_group_mode() -> None:
    rules = (ROOT / "contrib" / "systemd" / "hydra-cachix-bridge.tmpfiles.conf").read_text()
    module = (ROOT / "nixos" / "module.nix").read_text()
    for sub in ("", "/incoming", "/tmp", "/quarantine"):
        assert re.search(rf"^d /var/spool/hydra-cachix-bridge{sub}\s+3770 ", rules, re.M), sub
        assert f'"${{spool}}{sub}"' in module or (sub == "" and "spool\n" in module)
    from bridge.spool import SpoolLayout

    assert {"incoming", "tmp", "quarantine"} == {
        p.name
        for p in (
            SpoolLayout(Path("/s")).incoming,
            SpoolLayout(Path("/s")).tmp,
            SpoolLayout(Path("/s")).quarantine,
        )
    }
