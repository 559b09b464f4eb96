"""One line to the local syslog socket (journald's /dev/log), for commands run by hand."""

from __future__ import annotations

import socket

IDENT = "hydra-cachix-bridge"
_USER_INFO = 1 * 8 + 6  # facility user, severity info


def syslog_line(message: str, *, address: str = "/dev/log", ident: str = IDENT) -> bool:
    """Send message as one info line; False when there is no syslog socket to take it."""
    text = " ".join(message.split())  # one line, whatever the message holds
    data = f"<{_USER_INFO}>{ident}: {text}".encode("utf-8", errors="backslashreplace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.connect(address)
            sock.send(data)
    except OSError:
        return False
    return True
