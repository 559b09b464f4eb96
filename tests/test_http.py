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

from bridge.landing import LandingSnapshot, render_landing
from bridge.statedb import CacheHealth, CacheStatus, DeadLetter
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


def test_landing_page_is_rendered_at_request_time_and_a_failure_is_500(
    registry: CollectorRegistry,
) -> None:
    pages = iter(["<p>first</p>", "<p>second</p>"])

    def page() -> str:
        try:
            return next(pages)
        except StopIteration:
            raise RuntimeError("database gone") from None

    srv = MetricsServer(registry, list, address="127.0.0.1", port=0, version="1", landing=page)
    srv.start()
    try:
        url = f"http://127.0.0.1:{srv.port}/"
        assert get(url)[2] == "<p>first</p>" and get(url)[2] == "<p>second</p>"
        status, kind, body = get(url)
        assert status == 500 and kind.startswith("text/plain") and "RuntimeError" in body
    finally:
        srv.stop()


def test_landing_summary_shows_a_down_cache_and_escapes_everything() -> None:
    status = CacheStatus(
        "<team>",
        {"pending": 4, "inflight": 1, "pushed": 7, "skipped": 0, "dead": 2},
        1000.0,
        900.0,
        1100.0,
        "push failed: https://user:hunter2@cache.example/x <script>",
        CacheHealth("<team>", 1100.0, 1130.0, 3, "exit 1: <b>unreachable</b>"),
    )
    dead = DeadLetter(5, "<team>", "/nix/store/abc-<x>", 8, 1090.0, "exit_status", "boom & co")
    snapshot = LandingSnapshot(
        statuses=[status],
        dead=[dead],
        quarantine=None,
        log_sources=[("/var/log/<hook>.log", True)],
        problems=["spool watch on /x is not alive"],
        config_file="/etc/hcb & co.toml",
    )
    html = render_landing(snapshot, "1<2", now=1200.0)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "hunter2" not in html and "user:***@cache.example" in html
    assert 'class="down">down</span> since' in html and "3 failed push(es) since" in html
    assert "last error: exit 1: &lt;b&gt;unreachable&lt;/b&gt;" in html
    assert "&lt;team&gt;" in html and "/nix/store/abc-&lt;x&gt;" in html
    assert "boom &amp; co" in html and "1&lt;2" in html
    assert "retry --config /etc/hcb &amp; co.toml --all" in html
    assert "2 path(s) exhausted their attempts" in html
    assert "spool watch on /x is not alive" in html
    assert '/var/log/&lt;hook&gt;.log</code>: <span class="up">readable' in html
    assert "3m20s" in html  # oldest pending age
