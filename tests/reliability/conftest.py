"""Reliability tests reuse the integration fixtures (a daemon subprocess per test)."""

from tests.integration.conftest import daemon_factory

__all__ = ["daemon_factory"]
