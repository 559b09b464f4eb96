"""Run a function as another user in a forked child (root only), for permission tests."""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

NOBODY = 65534  # Debian's nobody:nogroup


def run_as(uid: int, gid: int, func: Callable[[], Any], groups: tuple[int, ...] = ()) -> Any:
    """Call func() with the given uid, gid and supplementary groups; return its result.

    An exception in the child is raised here as a RuntimeError with its traceback.
    """
    if os.geteuid() != 0:
        raise PermissionError("run_as needs root")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges for good, report, never return into pytest
        os.close(read_end)
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            payload = pickle.dumps((True, func()))
        except BaseException:
            payload = pickle.dumps((False, traceback.format_exc()))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    ok, value = pickle.loads(data)
    if not ok:
        raise RuntimeError(f"in the child running as {uid}:{gid}:\n{value}")
    return value
