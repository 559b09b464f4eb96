"""`init` as root in a temporary root: owners, groups and modes the producers need."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.init import InitError, init_directories, resolve_owner, wanted_directories
from bridge.spool import SpoolLayout
from tests.asuser import NOBODY, run_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="init's ownership tests need root")

SUBDIRS = ("", "incoming", "tmp", "quarantine")
SHARED_SUBDIRS = ("incoming", "tmp", "quarantine")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(root: Path, body: str = "", *, shared: bool = True, spool: bool = True) -> Path:
    config = root / "bridge.toml"
    config.write_text(
        f'state_dir = "{root}/var/lib/hcb"\n'
        + (f'spool_dir = "{root}/var/spool/hcb"\n' if spool else "")
        + f"[spool]\ngroup_writable = {'true' if shared else 'false'}\n"
        + f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{root}/cache"\n'
        + body
    )
    config.chmod(0o644)
    return config


def owner_mode(path: Path) -> tuple[int, int, int]:
    info = os.lstat(path)
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def test_shared_spool_as_the_tmpfiles_rules_make_it(shared_tmp: Path) -> None:
    config = write(shared_tmp)
    done = run("init", "--config", str(config), "--user", "nobody", "--group", "nogroup")
    assert done.returncode == 0, done.stderr
    spool, state = shared_tmp / "var/spool/hcb", shared_tmp / "var/lib/hcb"
    # The spool root and the hook directory are root's: nobody else, the daemon included,
    # can rename or replace what the root-run hook writes into.
    assert done.stdout.splitlines() == [
        f"created {state} (nobody:nogroup 0700)",
        f"created {spool} (root:root 0755)",
        *[f"created {spool / sub} (nobody:nogroup 3770)" for sub in SHARED_SUBDIRS],
        f"created {spool / 'hook'} (root:nogroup 2750)",
    ]
    assert owner_mode(state) == (NOBODY, NOBODY, 0o700)
    assert owner_mode(spool) == (0, 0, 0o755)
    for sub in SHARED_SUBDIRS:
        assert owner_mode(spool / sub) == (NOBODY, NOBODY, 0o3770), sub
    assert owner_mode(spool / "hook") == (0, NOBODY, 0o2750)
    assert SpoolLayout(spool).hook == spool / "hook"
    # Parents that did not exist are ordinary root directories.
    assert owner_mode(shared_tmp / "var/spool") == (0, 0, 0o755)
    # Run again: nothing to do, nothing changed.
    again = run("init", "--config", str(config), "--user", "nobody", "--group", "nogroup")
    assert again.returncode == 0, again.stderr
    assert all(line.startswith("ok ") for line in again.stdout.splitlines()), again.stdout
    assert len(again.stdout.splitlines()) == 6
    assert owner_mode(spool / "incoming") == (NOBODY, NOBODY, 0o3770)
    # The daemon's own ensure() finds nothing to change (it may not chmod under systemd).
    before = [owner_mode(spool / sub) for sub in (*SUBDIRS, "hook")]
    SpoolLayout(spool).ensure(group_writable=True)
    assert [owner_mode(spool / sub) for sub in (*SUBDIRS, "hook")] == before


def test_repairs_what_differs(shared_tmp: Path) -> None:
    config = write(shared_tmp)
    assert run("init", "--config", str(config), "--group", "nogroup").returncode == 0
    incoming = shared_tmp / "var/spool/hcb/incoming"
    os.chmod(incoming, 0o755)
    os.chown(incoming, 0, 0)
    done = run("init", "--config", str(config), "--group", "nogroup")
    assert done.returncode == 0, done.stderr
    assert (
        f"fixed {incoming} (root:nogroup 3770): owner root:root → root:nogroup, "
        "mode 0755 → 3770" in done.stdout.splitlines()
    )
    assert owner_mode(incoming) == (0, NOBODY, 0o3770)


def test_producers_in_the_group_can_write_others_cannot(shared_tmp: Path) -> None:
    """A RunCommand-like user in the group records an event; a stranger cannot."""
    config = write(shared_tmp)
    assert run("init", "--config", str(config), "--group", "nogroup").returncode == 0
    layout = SpoolLayout(load_config(config).spool_dir)

    def record(name: str) -> str:
        tmp = layout.tmp / name
        tmp.write_text("{}")
        os.rename(tmp, layout.incoming / name)
        return name

    assert run_as(NOBODY, NOBODY, lambda: record("e.json")) == "e.json"
    event = layout.incoming / "e.json"
    assert event.stat().st_gid == NOBODY  # setgid: files keep the spool's group
    with pytest.raises(RuntimeError, match="PermissionError"):
        run_as(12345, 12345, lambda: record("f.json"))


def test_private_spool_without_a_group(shared_tmp: Path) -> None:
    config = write(shared_tmp, shared=False)
    done = run("init", "--config", str(config))
    assert done.returncode == 0, done.stderr
    for sub in (*SUBDIRS, "hook"):
        assert owner_mode(shared_tmp / "var/spool/hcb" / sub) == (0, 0, 0o700)
    assert owner_mode(shared_tmp / "var/lib/hcb") == (0, 0, 0o700)


def test_shared_spool_inside_the_state_directory(shared_tmp: Path) -> None:
    """The default spool (<state>/spool): the group may pass through the state directory."""
    config = write(shared_tmp, spool=False)
    done = run("init", "--config", str(config), "--group", "nogroup")
    assert done.returncode == 0, done.stderr
    state = shared_tmp / "var/lib/hcb"
    assert owner_mode(state) == (0, NOBODY, 0o710)
    assert owner_mode(state / "spool" / "incoming") == (0, NOBODY, 0o3770)
    loaded = load_config(config)
    assert [wanted.path for wanted in wanted_directories(loaded)] == [
        state,
        *SpoolLayout(state / "spool").directories,
        state / "spool" / "hook",
    ]


def test_refuses_a_hook_directory_below_the_daemons_state(shared_tmp: Path) -> None:
    """A daemon-owned directory above the hook's would let the daemon redirect root."""
    config = write(shared_tmp, spool=False)
    done = run("init", "--config", str(config), "--user", "nobody", "--group", "nogroup")
    assert done.returncode == 1
    assert "would not be root's alone" in done.stderr
    assert "belongs to nobody" in done.stderr and "outside the state directory" in done.stderr
    assert not (shared_tmp / "var").exists()
    # A hook directory of its own, outside the state directory, is fine.
    text = config.read_text().replace(
        "[spool]\n", f'[spool]\nhook_dir = "{shared_tmp}/var/spool/hcb-hook"\n'
    )
    config.write_text(text)
    done = run("init", "--config", str(config), "--user", "nobody", "--group", "nogroup")
    assert done.returncode == 0, done.stderr
    assert owner_mode(shared_tmp / "var/spool/hcb-hook") == (0, NOBODY, 0o2750)


def test_refuses_a_shared_spool_under_a_directory_others_may_write(shared_tmp: Path) -> None:
    os.chmod(shared_tmp, 0o777)  # no sticky bit: anyone could swap the spool
    config = write(shared_tmp)
    done = run("init", "--config", str(config), "--group", "nogroup")
    assert done.returncode == 1
    assert "without the sticky bit" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group", "no-such-group-hcb"], "unknown group 'no-such-group-hcb'"),
        (["--user", "no-such-user-hcb"], "unknown user 'no-such-user-hcb'"),
    ],
)
def test_refuses_unknown_names_and_changes_nothing(
    shared_tmp: Path, args: list[str], message: str
) -> None:
    config = write(shared_tmp)
    done = run("init", "--config", str(config), *args)
    assert done.returncode == 2 and message in done.stderr
    assert not (shared_tmp / "var").exists()


def test_refuses_a_group_for_a_private_spool(shared_tmp: Path) -> None:
    config = write(shared_tmp, shared=False)
    done = run("init", "--config", str(config), "--group", "nogroup")
    assert done.returncode == 2
    assert "group_writable = false" in done.stderr and "Set group_writable = true" in done.stderr
    assert not (shared_tmp / "var").exists()


def test_refuses_links_and_files_in_place_of_directories(shared_tmp: Path) -> None:
    config = write(shared_tmp)
    spool = shared_tmp / "var/spool/hcb"
    spool.parent.mkdir(parents=True)
    (shared_tmp / "elsewhere").mkdir()
    spool.symlink_to(shared_tmp / "elsewhere")
    done = run("init", "--config", str(config), "--group", "nogroup")
    assert done.returncode == 1
    assert f"{spool} is a symbolic link; refusing to follow it" in done.stderr
    assert not (shared_tmp / "var/lib").exists()  # checked before anything was made
    spool.unlink()
    spool.write_text("")
    done = run("init", "--config", str(config), "--group", "nogroup")
    assert done.returncode == 1 and f"{spool} exists and is not a directory" in done.stderr


def test_a_non_root_user_can_only_init_for_itself(shared_tmp: Path) -> None:
    config = write(shared_tmp, shared=False)
    loaded = load_config(config)

    def attempt(user: str | None) -> str:
        try:
            return repr(resolve_owner(loaded, user, None))
        except InitError as exc:
            return str(exc)

    assert run_as(NOBODY, NOBODY, lambda: attempt("root")) == (
        "only root can give the directories to user 'root'"
    )
    os.chmod(shared_tmp, 0o777)
    owner = resolve_owner(loaded, "nobody", None)
    lines = run_as(NOBODY, NOBODY, lambda: init_directories(loaded, owner))
    assert lines[0] == f"created {shared_tmp}/var/lib/hcb (nobody:nogroup 0700)"
    assert owner_mode(shared_tmp / "var/spool/hcb/tmp") == (NOBODY, NOBODY, 0o700)


def test_hook_script_warns_until_the_spool_exists(shared_tmp: Path) -> None:
    config = write(shared_tmp)
    done = run("hook-script", "--config", str(config))
    assert done.returncode == 0 and done.stdout.startswith("#!/bin/sh\n")
    assert f"warning: the spool {shared_tmp}/var/spool/hcb or its hook directory" in done.stderr
    assert "hydra-cachix-bridge init" in done.stderr
    assert run("init", "--config", str(config), "--group", "nogroup").returncode == 0
    done = run("hook-script", "--config", str(config))
    assert done.returncode == 0 and done.stderr == ""


def test_hook_script_as_root_refuses_a_hook_directory_the_daemon_could_swap(
    shared_tmp: Path,
) -> None:
    """Today's layout before init repairs it: the spool root belongs to the daemon."""
    config = write(shared_tmp)
    spool = shared_tmp / "var/spool/hcb"
    SpoolLayout(spool).ensure(group_writable=True)
    (spool / "hook").mkdir(mode=0o750)
    os.chown(spool, NOBODY, NOBODY)
    done = run("hook-script", "--config", str(config))
    assert done.returncode == 1 and done.stdout == ""
    assert f"{spool} is owned by nobody" in done.stderr
    assert "Another user could redirect the hook's writes" in done.stderr
    assert run("init", "--config", str(config), "--group", "nogroup").returncode == 0
    done = run("hook-script", "--config", str(config))
    assert done.returncode == 0 and done.stderr == ""
