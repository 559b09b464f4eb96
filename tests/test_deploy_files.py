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
        "Group=hydra-cachix-bridge-producers\n",
        "LimitNOFILE=16384\n",
        "TasksMax=4096\n",
        "MemoryMax=8G\n",
    ):
        assert line in text, line
    # cachix is a GHC program whose runtime mprotect()s FFI callback code executable.
    assert "MemoryDenyWriteExecute=yes" not in text


def test_tmpfiles_make_the_spool_as_init_does() -> None:
    """The contrib tmpfiles rules and `init --group` give the same owners and modes: the
    spool root and the hook directory root's, the producers' directories the daemon's."""
    from bridge.config import parse_config
    from bridge.init import wanted_directories

    rules = (ROOT / "contrib" / "systemd" / "hydra-cachix-bridge.tmpfiles.conf").read_text()
    made = {}
    for line in rules.splitlines():
        if line.startswith("d /var/spool/"):
            _, path, mode, user, group, *age = line.split()
            made[path] = (int(mode, 8), user, group, age)
    config = parse_config(
        {
            "spool_dir": "/var/spool/hydra-cachix-bridge",
            "spool": {"group_writable": True},
            "caches": {"c": {"backend": "cachix"}},
        },
        "<test>",
    )
    daemon, group = "hydra-cachix-bridge", "hydra-cachix-bridge-producers"
    wanted = [w for w in wanted_directories(config) if str(w.path).startswith("/var/spool/")]
    assert {str(w.path) for w in wanted} == set(made)
    for entry in wanted:
        mode, user, owner_group, age = made[str(entry.path)]
        assert mode == entry.mode, entry
        assert user == ("root" if entry.root_owned else daemon), entry
        if entry.path == config.hook_dir:
            assert owner_group == group and age == ["7d"]  # aged out: the daemon cannot delete
        elif entry.root_owned:
            assert owner_group == "root" and mode & 0o022 == 0
        else:
            assert owner_group == group and mode == 0o3770
    module = (ROOT / "nixos" / "module.nix").read_text()
    assert '"d ${spool} 0755 root root - -"' in module
    assert '"d ${hookDir} 2750 root ${cfg.group} ${cfg.hookRetention} -"' in module
    sysusers = (ROOT / "contrib" / "systemd" / "hydra-cachix-bridge.sysusers.conf").read_text()
    assert f"g {group} -" in sysusers and f"-:{group} " in sysusers
    assert "u hydra-cachix-bridge -:hydra " not in sysusers
