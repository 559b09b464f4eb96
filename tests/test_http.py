"""exporter/http.py: landing page, /metrics, /healthz, TLS, served on a real socket."""

from __future__ import annotations

import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from exporter.http import MetricsServer


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("hydra_cachix_bridge_test_total", "a test counter", registry=registry).inc(3)
    return registry


@pytest.fixture
def problems() -> list[str]:
    return []


@pytest.fixture
def server(registry: CollectorRegistry, problems: list[str]) -> Iterator[MetricsServer]:
    srv = MetricsServer(
        registry, lambda: list(problems), address="127.0.0.1", port=0, version="1.2.3"
    )
    srv.start()
    yield srv
    srv.stop()


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_landing_page_links_metrics_and_health(server: MetricsServer) -> None:
    status, kind, body = get(f"http://127.0.0.1:{server.port}/")
    assert status == 200 and kind.startswith("text/html")
    assert 'href="/metrics"' in body and 'href="/healthz"' in body and "1.2.3" in body


def test_metrics_endpoint_serves_the_injected_registry(server: MetricsServer) -> None:
    status, kind, body = get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200 and kind.startswith("text/plain")
    assert "hydra_cachix_bridge_test_total 3.0" in body


def test_healthz_is_200_when_healthy_and_503_with_reasons(
    server: MetricsServer, problems: list[str]
) -> None:
    assert get(f"http://127.0.0.1:{server.port}/healthz")[0::2] == (200, "ok\n")
    problems.append("spool watch on /x is not alive")
    status, _, body = get(f"http://127.0.0.1:{server.port}/healthz")
    assert status == 503 and "spool watch on /x is not alive" in body


def test_unknown_path_is_404(server: MetricsServer) -> None:
    assert get(f"http://127.0.0.1:{server.port}/nope")[0] == 404


def test_tls(tmp_path: Path, registry: CollectorRegistry) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    srv = MetricsServer(
        registry,
        list,
        address="127.0.0.1",
        port=0,
        version="1",
        tls_cert_file=cert,
        tls_key_file=key,
    )
    srv.start()
    try:
        context = ssl.create_default_context(cafile=str(cert))
        status, _, body = get(f"https://127.0.0.1:{srv.port}/metrics", context)
        assert status == 200 and "hydra_cachix_bridge_test_total" in body
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"https://127.0.0.1:{srv.port}/metrics", timeout=5)
    finally:
        srv.stop()


def test_metrics_endpoint_serves_no_created_series(server: MetricsServer) -> None:
    _, _, body = get(f"http://127.0.0.1:{server.port}/metrics")
    assert "hydra_cachix_bridge_test_total 3.0" in body and "_created" not in body
