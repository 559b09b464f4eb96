"""`init`: create the state and spool directories with the owner, group and modes producers
need before the daemon's first start (what contrib/systemd's tmpfiles rules do)."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from bridge.config import Config
from bridge.spool import HOOK_DIR_MODE, SpoolLayout, spool_mode, unsafe_directory

# The state directory holds the queue and the lock: private to the daemon's user. When the
# spool lives inside it and is shared, the group may pass through (x) but not list (r).
STATE_MODE = 0o700
STATE_MODE_SHARED_SPOOL_INSIDE = 0o710


class InitError(Exception):
    """init refused or failed; the message says why and nothing was left half-changed."""


@dataclass(frozen=True)
class Owner:
    """Who owns the directories: the daemon's user and the group shared with producers."""

    user: str
    uid: int
    group: str
    gid: int


def resolve_owner(config: Config, user: str | None, group: str | None) -> Owner:
    """Check the user and group (default: this process's user and its primary group)."""
    try:
        account = pwd.getpwnam(user) if user is not None else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise InitError(f"unknown user {user!r}") from None
    if group is not None and not config.spool.group_writable:
        where = config.source_file or "the config"
        raise InitError(
            f"--group {group} shares the spool with that group, but {where} has "
            "[spool] group_writable = false: the daemon would make the spool private (0700) "
            "again at its start. Set group_writable = true, or leave out --group"
        )
    try:
        entry = grp.getgrnam(group) if group is not None else grp.getgrgid(account.pw_gid)
    except KeyError:
        if group is None:
            raise InitError(f"user {account.pw_name!r} has no valid primary group") from None
        raise InitError(f"unknown group {group!r}") from None
    owner = Owner(account.pw_name, account.pw_uid, entry.gr_name, entry.gr_gid)
    if os.geteuid() != 0:
        if owner.uid != os.geteuid():
            raise InitError(f"only root can give the directories to user {owner.user!r}")
        if owner.gid not in (os.getegid(), *os.getgroups()):
            raise InitError(
                f"cannot give the directories to group {owner.group!r}: only root or a "
                "member of that group can"
            )
    return owner


ROOT_MODE_SHARED = 0o755


@dataclass(frozen=True)
class Wanted:
    """One directory init manages: its mode and whether root (not the daemon) owns it."""

    path: Path
    mode: int
    root_owned: bool = False


def wanted_directories(config: Config) -> list[Wanted]:
    """Every directory init manages with its mode and owner, parents first.

    A shared spool's root and the hook directory belong to root: the root-run hook writes
    into the hook directory, so no other user, the daemon's included, may be able to
    rename or replace it or anything above it. The producers' directories belong to the
    daemon's user and the group (3770: setgid and sticky).
    """
    shared = config.spool.group_writable
    spool = SpoolLayout.of(config)
    inside = config.spool_dir.is_relative_to(config.state_dir)
    state_mode = STATE_MODE_SHARED_SPOOL_INSIDE if shared and inside else STATE_MODE
    wanted = [Wanted(config.state_dir, state_mode)]
    if inside:  # directories between the state directory and the spool
        for parent in reversed(config.spool_dir.parents):
            if parent.is_relative_to(config.state_dir) and parent != config.state_dir:
                wanted.append(Wanted(parent, state_mode))
    if shared:
        wanted.append(Wanted(spool.root, ROOT_MODE_SHARED, root_owned=True))
        wanted += [Wanted(d, spool_mode(True)) for d in spool.directories[1:]]
        wanted.append(Wanted(spool.hook, HOOK_DIR_MODE, root_owned=True))
    else:
        wanted += [Wanted(d, spool_mode(False)) for d in (*spool.directories, spool.hook)]
    return wanted


def _hook_ancestor_problem(config: Config, wanted: list[Wanted], owner: Owner) -> str | None:
    """Why the hook directory of a shared spool would not be root's alone, before anything
    is made: a directory above it owned by the daemon, or an existing unsafe one."""
    hook = SpoolLayout.of(config).hook
    managed = {w.path: w for w in wanted}
    for parent in reversed(hook.parents):
        entry = managed.get(parent)
        if entry is not None:
            if not entry.root_owned and owner.uid != 0:
                return (
                    f"{parent} belongs to {owner.user}, who could then replace the hook "
                    "directory below it; put spool_dir (or [spool] hook_dir) outside the "
                    'state directory, e.g. spool_dir = "/var/spool/hydra-cachix-bridge"'
                )
            continue
        if not os.path.lexists(parent):
            continue  # made by init: root's, 0755
        problem = unsafe_directory(parent, {0}, ancestor=True)
        if problem is not None:
            return problem
    return None


def init_directories(config: Config, owner: Owner) -> list[str]:
    """Create or repair each directory; return one line per directory saying what was done."""
    wanted = wanted_directories(config)
    for entry in wanted:  # refuse before changing anything
        if entry.path.is_symlink():
            raise InitError(f"{entry.path} is a symbolic link; refusing to follow it")
        if entry.path.exists() and not entry.path.is_dir():
            raise InitError(f"{entry.path} exists and is not a directory")
    if config.spool.group_writable:
        if os.geteuid() != 0:
            raise InitError(
                "a shared spool needs root: its root and the hook directory must belong to "
                "root, so that nobody else can redirect the root-run post-build-hook"
            )
        problem = _hook_ancestor_problem(config, wanted, owner)
        if problem is not None:
            raise InitError(f"the hook directory would not be root's alone: {problem}")
    root = Owner("root", 0, owner.group, owner.gid)
    lines = []
    for entry in wanted:
        who = owner
        if entry.root_owned:
            who = root if entry.mode == HOOK_DIR_MODE else Owner("root", 0, "root", 0)
        lines.append(_ensure(entry.path, entry.mode, who))
    return lines


def _ensure(directory: Path, mode: int, owner: Owner) -> str:
    created = False
    try:
        if not directory.exists():
            directory.parent.mkdir(parents=True, exist_ok=True)
            directory.mkdir(mode=0o700)
            created = True
        before = os.lstat(directory)
        changes = []
        if (before.st_uid, before.st_gid) != (owner.uid, owner.gid):
            os.chown(directory, owner.uid, owner.gid, follow_symlinks=False)
            if not created:
                changes.append(f"owner {_name(before.st_uid, before.st_gid)} → {_owner(owner)}")
        # After chown, which may clear the setgid bit.
        if stat.S_IMODE(os.lstat(directory).st_mode) != mode:
            os.chmod(directory, mode)
            if not created:
                changes.append(f"mode {stat.S_IMODE(before.st_mode):04o} → {mode:04o}")
    except OSError as exc:
        raise InitError(f"cannot set up {directory}: {exc.strerror or exc}") from None
    what = f"{directory} ({_owner(owner)} {mode:04o})"
    if created:
        return f"created {what}"
    if changes:
        return f"fixed {what}: {', '.join(changes)}"
    return f"ok      {what}"


def _owner(owner: Owner) -> str:
    return f"{owner.user}:{owner.group}"


def _name(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"
