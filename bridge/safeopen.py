"""Open files named by events without following links, blocking, or reading without bound."""

from __future__ import annotations

import errno
import os
import stat

# Errors that say "not now" about the machine, not "never" about the file: the file is
# left where it is for the next pass rather than quarantined or given up on.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EAGAIN, errno.EINTR}
)


def is_transient(exc: BaseException) -> bool:
    """True for an OSError that a later pass may not hit (out of descriptors, memory, I/O)."""
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


class NotRegularFile(Exception):
    """The path is a symbolic link, FIFO, socket, device or directory."""


class FileTooLarge(Exception):
    """The file is (or grew) larger than the caller's bound."""


def read_regular_file(
    path: str | os.PathLike[str], max_bytes: int, *, head_only: bool = False
) -> bytes:
    """Read a regular file's bytes; raise NotRegularFile, FileTooLarge or OSError.

    With head_only, a longer file is not an error: its first max_bytes bytes are returned.

    The last component is never followed (O_NOFOLLOW), opening never waits for a FIFO's
    writer (O_NONBLOCK), and fstat on the open descriptor decides, so a swap between a
    check and the open cannot smuggle another kind of file in.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        # ELOOP: a symlink; ENXIO: a socket or a FIFO without a writer on some systems.
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise NotRegularFile(f"{os.fspath(path)} is not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"{os.fspath(path)} is not a regular file")
        if info.st_size > max_bytes and not head_only:
            raise FileTooLarge(f"{os.fspath(path)} is {info.st_size} bytes, limit {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(65536, max_bytes + 1 - size))
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                if head_only:
                    chunks.append(chunk[: len(chunk) - (size - max_bytes)])
                    break
                raise FileTooLarge(f"{os.fspath(path)} grew beyond {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
