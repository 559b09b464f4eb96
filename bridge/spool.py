"""The spool: atomic event writes by producers, safe reads and quarantine by the daemon."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pwd
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.events import EventRejected

if TYPE_CHECKING:
    from bridge.config import Config

INCOMING = "incoming"
TMP = "tmp"
QUARANTINE = "quarantine"
HOOK = "hook"


class SpoolUnavailable(Exception):
    """A producer could not record an event (spool missing, unwritable, disk full)."""


@dataclass(frozen=True)
class SpoolLayout:
    """The three directories under the spool root, and the hook's own directory."""

    root: Path
    # None: <root>/hook. Only the hook's user (root under nix-daemon) may write there.
    hook_dir: Path | None = None

    @classmethod
    def of(cls, config: Config) -> SpoolLayout:
        """The layout a config names (spool_dir and [spool] hook_dir)."""
        return cls(config.spool_dir, config.hook_dir)

    @property
    def incoming(self) -> Path:
        """Complete event files waiting for the daemon."""
        return self.root / INCOMING

    @property
    def tmp(self) -> Path:
        """Where producers write before renaming into incoming (same filesystem)."""
        return self.root / TMP

    @property
    def quarantine(self) -> Path:
        """Rejected event files, each with a `.reason` file beside it."""
        return self.root / QUARANTINE

    @property
    def hook(self) -> Path:
        """The post-build-hook's channel: writable by the hook's user alone, read by the
        daemon, which never deletes there (tmpfiles ages the files out)."""
        return self.hook_dir or self.root / HOOK

    def in_hook_channel(self, path: Path) -> bool:
        """True for a file of the hook directory; when [spool] hook_dir names incoming/
        itself, its files are incoming's."""
        return path.parent == self.hook and self.hook != self.incoming

    @property
    def directories(self) -> tuple[Path, Path, Path, Path]:
        """The root and its three subdirectories, parents first."""
        return (self.root, self.incoming, self.tmp, self.quarantine)

    def ensure(self, group_writable: bool = False) -> None:
        """Create or fix the directories this process owns (daemon side).

        Directories owned by someone else (a root-owned spool root and hook directory made
        by `init` or tmpfiles) are left as they are; a shared spool root that is
        group- or world-writable without the sticky bit is refused.
        """
        mode = spool_mode(group_writable)
        me = os.geteuid()
        for directory in self.directories:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(directory)
            current = stat.S_IMODE(info.st_mode)
            if directory == self.root and _loose(current):
                if info.st_uid != me:
                    raise PermissionError(
                        errno.EPERM,
                        "writable by group or others without the sticky bit",
                        str(directory),
                    )
                os.chmod(directory, mode)
                continue
            if info.st_uid != me or current == mode:
                continue
            if directory == self.root and group_writable and current & 0o010:
                continue  # a root made by init (0755): producers pass through it
            # Only change what differs: under systemd's RestrictSUIDSGID= any chmod that
            # names the setgid bit fails, so directories made by tmpfiles are left alone.
            os.chmod(directory, mode)
        if not group_writable:
            # One user does everything (the embedded defaults): the hook is this user too.
            self.hook.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(self.hook)
            if info.st_uid == me and stat.S_IMODE(info.st_mode) != 0o700:
                os.chmod(self.hook, 0o700)


def _loose(mode: int) -> bool:
    """Writable by group or others without the sticky bit: anyone there may swap entries."""
    return bool(mode & 0o022) and not mode & stat.S_ISVTX


def spool_mode(group_writable: bool) -> int:
    """The mode of every spool directory: 3770 when producers share a group, else 0700."""
    # Group-writable spools are setgid (files keep the group) and sticky (producers
    # cannot remove or replace each other's files; the owning daemon still can).
    return 0o3770 if group_writable else 0o700


HOOK_DIR_MODE = 0o2750
"""The hook directory of a shared spool: root writes, the producers' group (the daemon) reads."""


def unsafe_directory(path: Path, trusted: Collection[int], *, ancestor: bool = False) -> str | None:
    """Why someone outside `trusted` (uids) could redirect writes into path, or None.

    Every component from / down must be a directory owned by a trusted uid; an ancestor
    others may write needs the sticky bit (then they cannot move its trusted child), and
    the directory itself must not be writable by group or others at all (unless it is only
    an ancestor of what will be checked, then the sticky bit is enough). Symbolic links on
    the way are checked, then followed.
    """
    normal = Path(os.path.normpath(Path(path).absolute()))
    return _unsafe(normal, frozenset(trusted), 0, ancestor)


def _unsafe(path: Path, trusted: frozenset[int], depth: int, ancestor: bool) -> str | None:
    if depth > 16:
        return f"{path}: too many symbolic links"
    current = Path(path.anchor)
    parts = path.parts[1:]
    for index in range(len(parts) + 1):
        if index:
            current = current / parts[index - 1]
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return f"{current} is missing"
        except OSError as exc:
            return f"{current}: {exc.strerror}"
        last = index == len(parts)
        if info.st_uid not in trusted:
            return f"{current} is owned by {_user(info.st_uid)}"
        if stat.S_ISLNK(info.st_mode):
            # The link is trusted (its owner, and its parent checked above): check its target.
            target = Path(os.path.normpath(current.parent / os.readlink(current)))
            return _unsafe(target.joinpath(*parts[index:]), trusted, depth + 1, ancestor)
        if not stat.S_ISDIR(info.st_mode):
            return f"{current} is not a directory"
        mode = stat.S_IMODE(info.st_mode)
        if last and not ancestor and mode & 0o022:
            who = " and ".join(w for b, w in ((0o020, "group"), (0o002, "others")) if mode & b)
            return f"{current} is writable by {who}"
        if _loose(mode):
            return f"{current} is writable by group or others without the sticky bit"
    return None


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def event_file_name(kind: str) -> str:
    """A unique name for a new event file: kind, time, pid and random bits."""
    return f"{kind}-{time.time_ns()}-{os.getpid()}-{os.urandom(4).hex()}.json"


def write_event(
    layout: SpoolLayout, kind: str, document: Any, max_bytes: int | None = None
) -> Path:
    """Write one event atomically (tmp, fsync, rename into incoming); raise SpoolUnavailable.

    Raises EventRejected("too_large") when the file would exceed max_bytes, the limit the
    daemon reads with.
    """
    name = event_file_name(kind)
    # ASCII escapes keep any string (even undecodable environment bytes) valid JSON.
    data = json.dumps(document, separators=(",", ":")).encode("ascii")
    if max_bytes is not None and len(data) > max_bytes:
        raise EventRejected("too_large", f"event would be {len(data)} bytes, limit {max_bytes}")
    tmp = layout.tmp / name
    target = layout.incoming / name
    if not layout.incoming.is_dir() or not layout.tmp.is_dir():
        raise SpoolUnavailable(
            f"spool {layout.root} is missing {INCOMING}/ or {TMP}/ (has the daemon run once?)"
        )
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o660)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise SpoolUnavailable(f"cannot write event to {layout.root}: {_describe(exc)}") from None
    return target


def write_hook_event(layout: SpoolLayout, document: Any, max_bytes: int | None = None) -> Path:
    """Write one hook event into the hook directory (what the sh hook does, from Python).

    The directory and every one above it must be writable by this user and root alone;
    the file is created exclusively, never through a link, and ends with the newline that
    tells the daemon it is complete. Raises SpoolUnavailable or EventRejected("too_large").
    """
    data = json.dumps(document, separators=(",", ":")).encode("ascii") + b"\n"
    if max_bytes is not None and len(data) > max_bytes:
        raise EventRejected("too_large", f"event would be {len(data)} bytes, limit {max_bytes}")
    problem = unsafe_directory(layout.hook, {0, os.geteuid()})
    if problem is not None:
        raise SpoolUnavailable(f"hook directory {layout.hook} is not safe to write: {problem}")
    name = event_file_name("hook")
    try:
        dir_fd = os.open(layout.hook, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SpoolUnavailable(f"cannot open {layout.hook}: {_describe(exc)}") from None
    try:
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640, dir_fd=dir_fd
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            os.unlink(name, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)
    except OSError as exc:
        raise SpoolUnavailable(f"cannot write event to {layout.hook}: {_describe(exc)}") from None
    finally:
        os.close(dir_fd)
    return layout.hook / name


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def is_candidate(name: str) -> bool:
    """True for names the daemon should read; dotfiles and `.tmp` names are in progress."""
    return not name.startswith(".") and not name.endswith((".tmp", ".reason"))


@dataclass(frozen=True)
class EventFile:
    """The raw bytes of one event file and its modification time."""

    path: Path
    data: bytes
    mtime: float
    # The file's identity: a hook file is never deleted by the daemon, so it remembers these.
    inode: int = 0
    mtime_ns: int = 0


def read_event_file(path: Path, max_bytes: int) -> EventFile:
    """Read a regular, non-symlink event file up to max_bytes; raise EventRejected otherwise."""
    # lstat first: opening a socket fails (ENXIO) before fstat could say what it is.
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode):
        raise EventRejected("not_regular_file", "event file is a symbolic link")
    if not stat.S_ISREG(link.st_mode):
        raise EventRejected("not_regular_file", "event file is not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EventRejected("not_regular_file", "event file is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise EventRejected("not_regular_file", "event file is not a regular file")
        if info.st_nlink > 1:
            # Producers never hard-link; another name may be a file outside the spool.
            raise EventRejected("not_regular_file", "event file has other hard links")
        if info.st_size > max_bytes:
            raise EventRejected(
                "too_large", f"event file is {info.st_size} bytes, limit is {max_bytes}"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise EventRejected("too_large", f"event file grew beyond {max_bytes} bytes")
            chunks.append(chunk)
        return EventFile(
            path=path,
            data=b"".join(chunks),
            mtime=info.st_mtime,
            inode=info.st_ino,
            mtime_ns=info.st_mtime_ns,
        )
    finally:
        os.close(fd)


NAME_MAX = 255
REASON_SUFFIX = ".reason"


def reason_path(target: Path) -> Path:
    """Where the reason of a quarantined file is written: NAME.reason, or for a name too
    long for that, a shortened name (its record's `quarantined_as` names the file)."""
    name = os.fsencode(target.name)
    if len(name) + len(REASON_SUFFIX) <= NAME_MAX:
        return target.with_name(target.name + REASON_SUFFIX)
    digest = hashlib.sha256(name).hexdigest()[:16]
    keep = NAME_MAX - len(REASON_SUFFIX) - len(digest) - 1
    return target.with_name(os.fsdecode(name[:keep]) + "~" + digest + REASON_SUFFIX)


def quarantine(layout: SpoolLayout, path: Path, reason: str, message: str, now: float) -> Path:
    """Move a rejected file (never following links) into quarantine with a `.reason` file."""
    layout.quarantine.mkdir(parents=True, exist_ok=True)
    base = path.name if is_candidate(path.name) else f"_{path.name.lstrip('.')}"
    target = layout.quarantine / base
    counter = 1
    while os.path.lexists(target) or os.path.lexists(reason_path(target)):
        suffix = f".{counter}"
        raw = os.fsencode(base)[: NAME_MAX - len(suffix)]
        target = layout.quarantine / (os.fsdecode(raw) + suffix)
        counter += 1
    # The reason first: if the disk is full, the file stays where it is (and is tried
    # again later) rather than sitting in quarantine without its reason.
    _write_reason(target, path.name, reason, message, now)
    try:
        os.rename(path, target)
    except OSError:
        _unlink_quietly(reason_path(target))
        raise
    return target


def _write_reason(target: Path, original: str, reason: str, message: str, now: float) -> None:
    record = {
        "file": original,
        "quarantined_as": target.name,
        "reason": reason,
        "message": message,
        "quarantined_at": now,
    }
    reason_file = reason_path(target)
    fd = os.open(reason_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
    except OSError:
        _unlink_quietly(reason_file)
        raise


def discard_quarantined(target: Path) -> None:
    """Remove a file put into quarantine and its `.reason` file (undoing a copy)."""
    _unlink_quietly(reason_path(target))
    _unlink_quietly(target)


def quarantine_bytes(
    layout: SpoolLayout, kind: str, data: bytes, reason: str, message: str, now: float
) -> Path:
    """Save rejected producer input straight into quarantine with its `.reason` file."""
    target = layout.quarantine / event_file_name(kind)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        _write_reason(target, target.name, reason, message, now)
    except OSError:
        _unlink_quietly(target)
        raise
    return target
