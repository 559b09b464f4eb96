"""Issue 11 findings 5 and 6: idle, slow and too many HTTP clients never block a scrape."""

from __future__ import annotations

import contextlib
import gzip
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from exporter.http import MetricsServer

IDLE_CLIENTS = 400
# The client's own give-up time: a scrape that waited behind the idle clients fails.
SCRAPE_TIMEOUT = 1.0


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("hydra_cachix_bridge_test_total", "a test counter", registry=registry).inc(3)
    Counter("hydra_cachix_bridge_other_total", "another counter", registry=registry).inc()
    return registry


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,IP:::1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextlib.contextmanager
def serving(registry: CollectorRegistry, **kwargs: Any) -> Iterator[MetricsServer]:
    kwargs.setdefault("address", "127.0.0.1")
    server = MetricsServer(registry, list, port=0, version="t", **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def idle_clients(port: int, count: int, host: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """count TCP connections that never send a byte (no request, no TLS handshake)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            client = socket.socket(family, socket.SOCK_STREAM)
            client.connect((host, port))
            clients.append(client)
        yield clients
    finally:
        for client in clients:
            client.close()


def scrape(url: str, context: ssl.SSLContext | None = None, **headers: str) -> tuple[float, Any]:
    request = urllib.request.Request(url, headers=headers)
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT, context=context) as reply:
        body = reply.read()
        return time.monotonic() - started, (reply.status, dict(reply.headers), body)


def test_hundreds_of_idle_connections_do_not_block_a_scrape(
    registry: CollectorRegistry, report: dict[str, Any]
) -> None:
    with serving(registry) as server:
        threads = threading.active_count()
        with idle_clients(server.port, IDLE_CLIENTS):
            time.sleep(0.2)  # every idle client accepted and waiting
            # Waiting clients cost a descriptor each, not a thread (finding 6).
            idle_threads = threading.active_count() - threads
            elapsed, (status, _, body) = scrape(f"http://127.0.0.1:{server.port}/metrics")
            assert status == 200 and b"hydra_cachix_bridge_test_total 3.0" in body
            health_elapsed, (code, _, _) = scrape(f"http://127.0.0.1:{server.port}/healthz")
            assert code == 200
    assert idle_threads <= 1
    report["idle_clients"] = IDLE_CLIENTS
    report["scrape_seconds"] = round(elapsed, 4)
    report["healthz_seconds"] = round(health_elapsed, 4)
    print(f"\n{IDLE_CLIENTS} idle clients: /metrics in {elapsed * 1000:.1f} ms")


def test_with_tls_idle_connections_that_never_handshake_do_not_block_a_scrape(
    registry: CollectorRegistry, certificate: tuple[Path, Path], report: dict[str, Any]
) -> None:
    cert, key = certificate
    context = ssl.create_default_context(cafile=str(cert))
    tls: dict[str, Any] = {"tls_cert_file": cert, "tls_key_file": key}
    with serving(registry, **tls) as server, idle_clients(server.port, IDLE_CLIENTS):
        time.sleep(0.2)
        url = f"https://127.0.0.1:{server.port}"
        elapsed, (status, _, body) = scrape(f"{url}/metrics", context)
        assert status == 200 and b"hydra_cachix_bridge_test_total" in body
        health_elapsed, (code, _, _) = scrape(f"{url}/healthz", context)
        assert code == 200
    report["idle_tcp_clients_without_handshake"] = IDLE_CLIENTS
    report["tls_scrape_seconds"] = round(elapsed, 4)
    report["tls_healthz_seconds"] = round(health_elapsed, 4)
    print(f"\n{IDLE_CLIENTS} idle TLS clients: /metrics in {elapsed * 1000:.1f} ms")


def test_slow_clients_are_cut_off_and_do_not_block_a_scrape(registry: CollectorRegistry) -> None:
    with serving(registry, head_timeout=1.0) as server:
        slow: list[socket.socket] = []
        stop = threading.Event()

        def trickle() -> None:
            # One byte of a never-ending header every 100 ms per client.
            while not stop.is_set():
                for client in list(slow):
                    with contextlib.suppress(OSError):
                        client.send(b"X")
                stop.wait(0.1)

        for _ in range(100):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            slow.append(client)
        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            _, (status, _, _) = scrape(f"http://127.0.0.1:{server.port}/metrics")
            assert status == 200
            time.sleep(1.5)  # beyond the head deadline: the server has closed them
            for client in slow:
                client.settimeout(2)
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    assert client.recv(1) == b""
        finally:
            stop.set()
            sender.join()
            for client in slow:
                client.close()


def test_an_idle_connection_is_closed_after_the_head_deadline(registry: CollectorRegistry) -> None:
    with serving(registry, head_timeout=0.5) as server:
        client = socket.create_connection(("127.0.0.1", server.port))
        client.settimeout(5)
        started = time.monotonic()
        assert client.recv(1) == b""
        assert time.monotonic() - started < 4
        client.close()


def test_more_clients_than_the_cap_evict_the_oldest_waiting_one(
    registry: CollectorRegistry,
) -> None:
    with serving(registry, max_pending=16) as server, idle_clients(server.port, 100) as clients:
        time.sleep(0.3)
        _, (status, _, _) = scrape(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
        clients[0].settimeout(2)
        assert clients[0].recv(1) == b""  # the oldest was closed to make room


def test_a_header_beyond_the_limit_is_refused(registry: CollectorRegistry) -> None:
    with serving(registry, max_head_bytes=1024) as server:
        client = socket.create_connection(("127.0.0.1", server.port))
        client.settimeout(5)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
        reply = client.recv(1024)
        client.close()
        assert reply.startswith(b"HTTP/1.0 431")


def test_serves_ipv6_loopback(registry: CollectorRegistry) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        server = MetricsServer(registry, list, address="::1", port=0, version="t")
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    server.start()
    try:
        assert server.listener.family == socket.AF_INET6
        _, (status, _, body) = scrape(f"http://[::1]:{server.port}/metrics")
        assert status == 200 and b"hydra_cachix_bridge_test_total 3.0" in body
        _, (code, _, _) = scrape(f"http://[::1]:{server.port}/healthz")
        assert code == 200
    finally:
        server.stop()


def test_metrics_negotiate_format_gzip_and_name_filters(registry: CollectorRegistry) -> None:
    with serving(registry) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        _, (_, headers, body) = scrape(url, **{"Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip"
        assert b"hydra_cachix_bridge_test_total 3.0" in gzip.decompress(body)
        _, (_, headers, body) = scrape(url, Accept="application/openmetrics-text; version=1.0.0")
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")
        _, (_, _, body) = scrape(url + "?name[]=hydra_cachix_bridge_other_total")
        assert b"hydra_cachix_bridge_other_total" in body
        assert b"hydra_cachix_bridge_test_total" not in body


def test_head_sends_headers_only(registry: CollectorRegistry) -> None:
    with serving(registry) as server:
        for path in ("/metrics", "/healthz", "/"):
            request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method="HEAD")
            with urllib.request.urlopen(request, timeout=5) as reply:
                assert reply.status == 200 and reply.read() == b""


EXHAUSTION = textwrap.dedent(
    """
    import resource, sys
    from prometheus_client import CollectorRegistry
    from exporter.http import MetricsServer

    server = MetricsServer(CollectorRegistry(), list, address="127.0.0.1", port=0, version="t")
    server.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    print(server.port, flush=True)
    sys.stdin.readline()
    """
)


def test_out_of_descriptors_the_server_sheds_idle_clients_and_still_serves(
    registry: CollectorRegistry,
) -> None:
    """A server with 64 descriptors and 200 idle clients: the oldest make room for a scrape."""
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", EXHAUSTION],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        with idle_clients(port, 200):
            time.sleep(0.5)  # the server ran out of descriptors accepting them
            for _ in range(3):
                _, (status, _, _) = scrape(f"http://127.0.0.1:{port}/healthz")
                assert status == 200
    finally:
        child.kill()
        child.wait(timeout=10)


def test_requests_beyond_the_cap_while_handlers_are_stuck_get_503_at_once(
    registry: CollectorRegistry,
) -> None:
    release = threading.Event()

    def slow_page() -> str:
        release.wait(10)
        return "<p>late</p>"

    server = MetricsServer(
        registry,
        list,
        address="127.0.0.1",
        port=0,
        version="t",
        landing=slow_page,
        handler_threads=1,
        max_pending=2,
    )
    server.start()
    clients: list[socket.socket] = []
    try:
        for _ in range(2):  # these two hold the only handler and the queue behind it
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            clients.append(client)
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", server.port))
        extra.settimeout(2)
        extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert extra.recv(64).startswith(b"HTTP/1.0 503")
        extra.close()
        release.set()
        for client in clients:
            client.settimeout(5)
            assert client.recv(64).startswith(b"HTTP/1.0 200")
        _, (status, _, _) = scrape(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
    finally:
        release.set()
        for client in clients:
            client.close()
        server.stop()
