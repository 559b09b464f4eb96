"""Shared fixtures: offline Nix, the stand-in cachix on PATH, config files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.nixhelpers import OFFLINE

FAKES = Path(__file__).parent / "fakes"


@pytest.fixture(autouse=True)
def _offline_nix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Nix command a test (or the code under test) runs stays off the network."""
    monkeypatch.setenv("NIX_CONFIG", (os.environ.get("NIX_CONFIG", "") + "\n" + OFFLINE).lstrip())


@pytest.fixture
def nix_available() -> None:
    """Skip only when Nix is genuinely missing (the test command installs it)."""
    if shutil.which("nix-build") is None:
        pytest.fail("nix-build is not installed: run the README's test command")


@pytest.fixture
def fake_cachix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the stand-in cachix first on PATH; returns its cache root ($FAKE_CACHIX_ROOT)."""
    root = tmp_path / "cachix-caches"
    root.mkdir()
    bindir = tmp_path / "fake-bin"
    bindir.mkdir()
    (bindir / "cachix").symlink_to(FAKES / "cachix")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CACHIX_ROOT", str(root))
    monkeypatch.setenv("FAKE_CACHIX_LOG", str(tmp_path / "cachix-calls.jsonl"))
    # Never pick up a real ~/.config/cachix/cachix.dhall from the machine running the tests.
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    return root


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write a TOML config (state under tmp_path unless it says otherwise); return its path."""
    counter = iter(range(1000))

    def write(body: str, *, state: bool = True) -> Path:
        path = tmp_path / f"config-{next(counter)}.toml"
        head = f'state_dir = "{tmp_path / "state"}"\n' if state else ""
        path.write_text(head + body)
        return path

    return write


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory for Nix expressions."""
    path = tmp_path / "work"
    path.mkdir()
    yield path


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A scratch directory other users can reach (pytest's tmp_path is root's alone)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="hcb-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
