"""bridge/syslogline.py: one line to a real Unix datagram socket, as journald's /dev/log."""

from __future__ import annotations

import socket
from pathlib import Path

from bridge.syslogline import syslog_line


def test_sends_one_info_line_with_the_ident(tmp_path: Path) -> None:
    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(5)
        assert syslog_line("retry (all): 3 path(s)\nforged line", address=address)
        data = server.recv(4096).decode()
    assert data == "<14>hydra-cachix-bridge: retry (all): 3 path(s) forged line"


def test_without_a_syslog_socket_it_says_so(tmp_path: Path) -> None:
    assert syslog_line("x", address=str(tmp_path / "missing")) is False
