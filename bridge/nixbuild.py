"""nix-build with a post-build-hook that runs in the caller's root, even inside a chroot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Nix run as root saves its mount namespace and enters a private one; before it runs the
# post-build-hook it returns with setns(), which also resets the root directory to the
# namespace's root. Nix 2.8 does not chroot back afterwards (later versions save the root
# too), so inside a chroot its hook runs against the host's root: "executing HOOK: No such
# file or directory", and the build fails. Hiding /proc/self/ns from nix-build makes it
# skip the private namespace (it needs one only to remount a read-only store).
_HIDE_MOUNT_NAMESPACE = 'mount -t tmpfs -o size=4k hcb-hide-ns "/proc/$$/ns" 2>/dev/null; exec "$@"'


def in_chroot(mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """True when no mount is at "/" as this process sees it, i.e. its root was chroot()ed."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return False
    return not any(len(fields) > 4 and fields[4] == "/" for fields in map(str.split, lines))


def nix_build_command(args: list[str], *, with_hook: bool) -> list[str]:
    """The argument list that runs `nix-build ARGS` so that its post-build-hook finds its files."""
    command = ["nix-build", *args]
    if not with_hook or os.geteuid() != 0 or not in_chroot():
        return command
    unshare = shutil.which("unshare")
    if unshare is None:
        return command
    return [
        unshare,
        "--mount",
        "--propagation",
        "unchanged",
        "/bin/sh",
        "-c",
        _HIDE_MOUNT_NAMESPACE,
        "sh",
        *command,
    ]
