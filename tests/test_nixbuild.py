"""Tests for bridge.nixbuild: the post-build-hook finds its files even inside a chroot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.nixbuild import in_chroot, nix_build_command

pytestmark = pytest.mark.nix

HOST = """\
25 1 254:0 / / rw,relatime - ext4 /dev/vda rw
67 25 0:39 / /proc rw,relatime - proc proc rw
"""
# What a chroot()ed process sees: the mounts under its root, none of them at "/".
CHROOTED = """\
67 25 0:39 / /proc rw,relatime - proc proc rw
68 25 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw
"""


def test_in_chroot_reads_mountinfo(tmp_path: Path) -> None:
    host, chrooted = tmp_path / "host", tmp_path / "chrooted"
    host.write_text(HOST)
    chrooted.write_text(CHROOTED)
    assert not in_chroot(host)
    assert in_chroot(chrooted)
    assert not in_chroot(tmp_path / "missing")  # no /proc: assume a normal root


def test_this_machine_is_seen_as_it_is() -> None:
    # The suite runs on a host (CI) or in a chroot (fresh-machine.sh, scripts/nix226.sh).
    mounts = Path("/proc/self/mountinfo").read_text().split("\n")
    assert in_chroot() == (not any(m.split()[4:5] == ["/"] for m in mounts if m))


def test_command_is_plain_without_a_hook_or_outside_a_chroot() -> None:
    assert nix_build_command(["x.nix"], with_hook=False) == ["nix-build", "x.nix"]
    if not in_chroot() or os.geteuid() != 0:
        assert nix_build_command(["x.nix"], with_hook=True) == ["nix-build", "x.nix"]


@pytest.mark.skipif(not in_chroot() or os.geteuid() != 0, reason="only root in a chroot")
def test_command_in_a_chroot_hides_the_mount_namespace() -> None:
    command = nix_build_command(["x.nix", "--no-out-link"], with_hook=True)
    assert command[0].endswith("unshare") and command[1:4] == [
        "--mount",
        "--propagation",
        "unchanged",
    ]
    assert command[-3:] == ["nix-build", "x.nix", "--no-out-link"]
