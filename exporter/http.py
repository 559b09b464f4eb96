"""HTTP exposition: landing page at /, metrics at /metrics, health at /healthz."""

from __future__ import annotations

import html
import logging
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from exporter.metrics import without_created

log = logging.getLogger(__name__)

HealthCheck = Callable[[], list[str]]
"""Returns the list of problems; empty means healthy."""
LandingPage = Callable[[], str]
"""Renders the landing page's HTML at request time."""


class MetricsServer:
    """A small threaded HTTP server for the bridge's endpoints."""

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
    ) -> None:
        handler = _make_handler(registry, health, version, landing)
        self.server = ThreadingHTTPServer((address, port), handler)
        self.server.daemon_threads = True
        if tls_cert_file is not None and tls_key_file is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(tls_cert_file, tls_key_file)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Serve in a background thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _make_handler(
    registry: CollectorRegistry, health: HealthCheck, version: str, page: LandingPage | None
) -> type[BaseHTTPRequestHandler]:
    exposed = without_created(registry)
    landing = (
        "<!doctype html><html><head><title>hydra-cachix-bridge</title></head><body>"
        f"<h1>hydra-cachix-bridge {html.escape(version)}</h1>"
        '<p><a href="/metrics">Metrics</a> · <a href="/healthz">Health</a></p>'
        "</body></html>\n"
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = f"hydra-cachix-bridge/{version}"

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(exposed))
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
