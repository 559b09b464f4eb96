"""HTTP exposition: landing page at /, metrics at /metrics, health at /healthz.

One event-loop thread accepts connections, does the TLS handshake and reads the request
head without blocking; only a complete request goes to a small pool of handler threads.
So an idle or slow client costs a descriptor, never a thread, and cannot hold up a scrape:
each connection has a deadline for its handshake and head, the head has a size limit, the
number of connections waiting is capped (the oldest goes when a new one arrives), and a
handler writes with a timeout. /metrics is client_python's `MetricsHandler` (content
negotiation, gzip, `name[]` filters).
"""

from __future__ import annotations

import contextlib
import errno
import html
import io
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from exporter.metrics import without_created

log = logging.getLogger(__name__)

HealthCheck = Callable[[], list[str]]
"""Returns the list of problems; empty means healthy."""
LandingPage = Callable[[], str]
"""Renders the landing page's HTML at request time."""

HEAD_TIMEOUT_SECONDS = 10.0
WRITE_TIMEOUT_SECONDS = 10.0
MAX_HEAD_BYTES = 16 * 1024
MAX_PENDING_CONNECTIONS = 512
HANDLER_THREADS = 4
_RECV_BYTES = 4096
# Accepting fails while the process is out of descriptors: pause accepting this long.
_ACCEPT_PAUSE_SECONDS = 0.1


def address_family(address: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The family and address to bind, chosen the way client_python's servers do."""
    infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])


@dataclass(eq=False)
class _Connection:
    """A client connection the event loop is reading a request head from."""

    sock: socket.socket
    address: Any
    deadline: float
    handshaking: bool
    head: bytearray = field(default_factory=bytearray)


class MetricsServer:
    """The bridge's HTTP endpoints, safe against idle, slow and too many clients."""

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthCheck,
        *,
        address: str,
        port: int,
        version: str,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        landing: LandingPage | None = None,
        head_timeout: float = HEAD_TIMEOUT_SECONDS,
        write_timeout: float = WRITE_TIMEOUT_SECONDS,
        max_head_bytes: int = MAX_HEAD_BYTES,
        max_pending: int = MAX_PENDING_CONNECTIONS,
        handler_threads: int = HANDLER_THREADS,
    ) -> None:
        self.handler = _make_handler(registry, health, version, landing)
        self.head_timeout = head_timeout
        self.write_timeout = write_timeout
        self.max_head_bytes = max_head_bytes
        self.max_pending = max_pending
        self.tls: ssl.SSLContext | None = None
        if tls_cert_file is not None and tls_key_file is not None:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
            self.tls.load_cert_chain(tls_cert_file, tls_key_file)
        family, bind_address = address_family(address, port)
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((bind_address, port))
            self.listener.listen(128)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            raise
        self.selector = selectors.DefaultSelector()
        self.pending: OrderedDict[socket.socket, _Connection] = OrderedDict()
        self.pool = ThreadPoolExecutor(handler_threads, thread_name_prefix="metrics-http")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = threading.Event()
        self._accept_paused_until = 0.0
        # Requests handed to the pool and not yet answered: capped like waiting ones.
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return int(self.listener.getsockname()[1])

    def start(self) -> None:
        """Serve in a background thread."""
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close every socket."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=True, cancel_futures=True)
        for conn in list(self.pending.values()):
            self._drop(conn)
        self.selector.close()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the event loop -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            self._expire(now)
            self._resume_accepting(now)
            try:
                events = self.selector.select(self._next_timeout(now))
            except OSError:
                log.exception("the metrics server's event loop failed")
                time.sleep(_ACCEPT_PAUSE_SECONDS)
                continue
            for key, _ in events:
                try:
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        self._progress(key.data)
                except Exception:
                    # One connection's trouble must never end the server.
                    log.exception("metrics server: error on a connection")
                    if key.data is not None:
                        self._drop(key.data)

    def _next_timeout(self, now: float) -> float:
        if not self.pending:
            return 1.0
        oldest = min(conn.deadline for conn in self.pending.values())
        return max(0.0, min(1.0, oldest - now))

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.pending.values() if c.deadline <= now]:
            self._drop(conn)

    def _resume_accepting(self, now: float) -> None:
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self.selector.register(self.listener, selectors.EVENT_READ, None)

    def _accept(self) -> None:
        for _ in range(256):  # a burst, then let the waiting connections have their turn
            try:
                sock, address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the oldest waiting client makes room for the next
                    # one; with none to give up, pause accepting briefly.
                    if self.pending:
                        self._drop(next(iter(self.pending.values())))
                        continue
                    self.selector.unregister(self.listener)
                    self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE_SECONDS
                return
            if len(self.pending) >= self.max_pending:
                self._drop(next(iter(self.pending.values())))
            sock.setblocking(False)
            handshaking = False
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                except OSError:
                    sock.close()
                    continue
                handshaking = True
            conn = _Connection(sock, address, time.monotonic() + self.head_timeout, handshaking)
            self.pending[sock] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _progress(self, conn: _Connection) -> None:
        """Advance one connection's handshake or head reading as far as it goes now."""
        sock = conn.sock
        if conn.handshaking:
            assert isinstance(sock, ssl.SSLSocket)
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self.selector.modify(sock, selectors.EVENT_WRITE | selectors.EVENT_READ, conn)
                return
            except (ssl.SSLError, OSError):
                self._drop(conn)
                return
            conn.handshaking = False
            self.selector.modify(sock, selectors.EVENT_READ, conn)
        while True:
            try:
                data = sock.recv(_RECV_BYTES)
            except (ssl.SSLWantReadError, BlockingIOError):
                return
            except (ssl.SSLError, OSError):
                self._drop(conn)
                return
            if not data:
                self._drop(conn)
                return
            conn.head += data
            end = conn.head.find(b"\r\n\r\n")
            if end < 0:
                end = conn.head.find(b"\n\n")
            if end >= 0 and end < self.max_head_bytes:
                self._dispatch(conn)
                return
            if len(conn.head) > self.max_head_bytes:
                self._refuse(conn, b"431 Request Header Fields Too Large")
                return

    def _forget(self, conn: _Connection) -> None:
        self.pending.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(conn.sock)

    def _drop(self, conn: _Connection) -> None:
        self._forget(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _refuse(self, conn: _Connection, status: bytes) -> None:
        self._forget(conn)
        with contextlib.suppress(OSError):
            conn.sock.send(b"HTTP/1.0 " + status + b"\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _dispatch(self, conn: _Connection) -> None:
        with self._in_flight_lock:
            busy = self._in_flight >= self.max_pending
            if not busy:
                self._in_flight += 1
        if busy:
            # Every handler is stuck (e.g. a slow landing page): answer at once, hold nothing.
            self._refuse(conn, b"503 Service Unavailable")
            return
        self._forget(conn)
        try:
            self.pool.submit(self._handle, conn)
        except RuntimeError:  # shutting down
            self._finished()
            with contextlib.suppress(OSError):
                conn.sock.close()

    def _finished(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    # -- a handler thread -----------------------------------------------------------------

    def _handle(self, conn: _Connection) -> None:
        sock = conn.sock
        try:
            sock.settimeout(self.write_timeout)
            self.handler(sock, conn.address, bytes(conn.head))
        except Exception as exc:
            if not isinstance(exc, OSError | ssl.SSLError):
                log.exception("metrics server: request failed")
        finally:
            self._finished()
            with contextlib.suppress(OSError):
                sock.close()


Handler = Callable[[socket.socket, Any, bytes], object]
"""Serves one request on a connected socket, given the request head already read."""


def _make_handler(
    registry: CollectorRegistry, health: HealthCheck, version: str, page: LandingPage | None
) -> Handler:
    exposed = without_created(registry)
    landing = (
        "<!doctype html><html><head><title>hydra-cachix-bridge</title></head><body>"
        f"<h1>hydra-cachix-bridge {html.escape(version)}</h1>"
        '<p><a href="/metrics">Metrics</a> · <a href="/healthz">Health</a></p>'
        "</body></html>\n"
    ).encode()

    class Handler(MetricsHandler):
        """client_python's metrics handler, with the landing page and /healthz beside it."""

        registry = exposed
        server_version = f"hydra-cachix-bridge/{version}"

        def __init__(self, sock: socket.socket, address: Any, head: bytes) -> None:
            self._head = head
            # Not BaseRequestHandler.__init__: the server object is not needed here.
            self.request = self.connection = sock
            self.client_address = address
            self.rfile = io.BytesIO(head)  # the complete request head, read by the loop
            self._out = sock.makefile("wb")
            self.wfile = self._out
            try:
                self.handle_one_request()
                self._out.flush()
            finally:
                with contextlib.suppress(OSError):
                    self._out.close()

        def end_headers(self) -> None:
            super().end_headers()
            if self.command == "HEAD":
                self._out.flush()
                self.wfile = io.BytesIO()  # the body is computed, not sent

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/metrics":
                super().do_GET()
            elif path == "/healthz":
                problems = health()
                body = ("ok\n" if not problems else "\n".join(problems) + "\n").encode()
                self._send(503 if problems else 200, "text/plain; charset=utf-8", body)
            elif path == "/":
                self._landing()
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _landing(self) -> None:
            if page is None:
                self._send(200, "text/html; charset=utf-8", landing)
                return
            try:
                body = page().encode("utf-8", errors="backslashreplace")
            except Exception as exc:
                log.exception("rendering the landing page failed")
                text = f"cannot render the summary: {type(exc).__name__} (see the log)\n"
                self._send(500, "text/plain; charset=utf-8", text.encode())
                return
            self._send(200, "text/html; charset=utf-8", body)

        do_HEAD = do_GET

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would flood the journal

    return Handler
