"""Unit tests for bridge.preflight: what check-config finds wrong on this host."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.preflight import check_host, file_cache_directory
from tests.asuser import NOBODY, run_as

Writer = Callable[..., Path]


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A bin directory with `cachix` and `nix`, a readable token, no credentials directory."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("cachix", "nix"):
        program = bindir / name
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return {"bin": bindir, "token": token}


def problems(path: Path) -> list[str]:
    return check_host(load_config(path))


def test_a_config_that_works_here(write_config: Writer, tmp_path: Path, host: dict) -> None:
    config = write_config(
        f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{host["token"]}"\n'
        f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{tmp_path}/cache/new?x=1"\n'
    )
    assert problems(config) == []


def test_missing_secret_file_names_the_key(
    write_config: Writer, tmp_path: Path, host: dict
) -> None:
    config = write_config(
        f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{tmp_path}/nope"\n'
        f'signing_key_file = "{host["token"]}"\ncachix_config = "{tmp_path}/gone.dhall"\n'
    )
    assert problems(config) == [
        f"{config}:caches.team.auth_token_file: cannot read secret file {tmp_path}/nope: "
        "No such file or directory",
        f"{config}:caches.team.cachix_config: cannot read secret file {tmp_path}/gone.dhall: "
        "No such file or directory",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"\xff\xfe", "is not UTF-8 text"), (b"a\0b", "contains a NUL byte")],
)
def test_unusable_secret_content(
    write_config: Writer, tmp_path: Path, host: dict, content: bytes, message: str
) -> None:
    secret = tmp_path / "bad"
    secret.write_bytes(content)
    config = write_config(f'[caches.team]\nbackend = "cachix"\nsigning_key_file = "{secret}"\n')
    [problem] = problems(config)
    assert problem.startswith(f"{config}:caches.team.signing_key_file: ") and message in problem


def test_secret_that_is_a_directory(write_config: Writer, tmp_path: Path, host: dict) -> None:
    config = write_config(f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{tmp_path}"\n')
    [problem] = problems(config)
    assert problem == (
        f"{config}:caches.team.auth_token_file: cannot read secret file {tmp_path}: Is a directory"
    )


def test_relative_secret_needs_credentials_directory(
    write_config: Writer, tmp_path: Path, host: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config('[caches.team]\nbackend = "cachix"\nauth_token_file = "cachix-token"\n')
    [problem] = problems(config)
    assert problem.startswith(f"{config}:caches.team.auth_token_file: secret file name ")
    assert "'cachix-token' is relative" in problem and "$CREDENTIALS_DIRECTORY" in problem
    credentials = tmp_path / "creds"
    credentials.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    [problem] = problems(config)
    assert f"cannot read secret file {credentials}/cachix-token" in problem
    (credentials / "cachix-token").write_text("t")
    assert problems(config) == []


def test_backend_executable_not_on_path(
    write_config: Writer, tmp_path: Path, host: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    config = write_config(
        '[caches.team]\nbackend = "cachix"\n'
        f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{tmp_path}/c"\n'
    )
    assert problems(config) == [
        f"{config}:caches.team.backend: 'cachix' is not on PATH ({empty}): install it, or set "
        "caches.team.executable to its path",
        f"{config}:caches.mirror.backend: 'nix' is not on PATH ({empty}): install it, or set "
        "caches.mirror.executable to its path",
    ]


def test_configured_executable(write_config: Writer, tmp_path: Path, host: dict) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not a program")
    plain.chmod(0o644)
    config = write_config(
        f'[caches.a]\nbackend = "cachix"\nexecutable = "{tmp_path}/missing"\n'
        f'[caches.b]\nbackend = "cachix"\nexecutable = "{tmp_path}"\n'
        f'[caches.c]\nbackend = "cachix"\nexecutable = "{host["bin"]}/cachix"\n'
        '[caches.d]\nbackend = "cachix"\nexecutable = "my-cachix"\n'
    )
    found = problems(config)
    assert found[:2] == [
        f"{config}:caches.a.executable: {tmp_path}/missing does not exist or is not a file",
        f"{config}:caches.b.executable: {tmp_path} does not exist or is not a file",
    ]
    assert found[2:] == [
        f"{config}:caches.d.executable: 'my-cachix' is not on PATH ({host['bin']}): install it"
    ]
    if os.geteuid() != 0:  # root may execute any file with an x bit only; 0644 has none
        return
    config = write_config(f'[caches.p]\nbackend = "cachix"\nexecutable = "{plain}"\n')
    assert problems(config) == [
        f"{config}:caches.p.executable: {plain} is not executable by this user"
    ]


def test_file_cache_directory_that_is_a_file(
    write_config: Writer, tmp_path: Path, host: dict
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    config = write_config(
        f'[caches.m]\nbackend = "nix-copy"\nuri = "file://{blocker}"\n'
        f'[caches.n]\nbackend = "nix-copy"\nuri = "file://{blocker}/sub/dir"\n'
    )
    assert problems(config) == [
        f"{config}:caches.m.uri: {blocker} (the binary cache) exists and is not a directory",
        f"{config}:caches.n.uri: cannot create {blocker}/sub/dir (the binary cache): {blocker} "
        "is not a directory",
    ]


def test_state_and_spool_directories(write_config: Writer, tmp_path: Path, host: dict) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    config = write_config(
        f'state_dir = "{blocker}"\nspool_dir = "{blocker}/spool"\n'
        f'[caches.m]\nbackend = "nix-copy"\nuri = "file://{tmp_path}/c"\n',
        state=False,
    )
    assert problems(config) == [
        f"{config}:state_dir: {blocker} (the queue database) exists and is not a directory",
        f"{config}:spool_dir: cannot create {blocker}/spool (the spool): {blocker} is not a "
        "directory",
    ]


def test_tls_files_must_be_readable(write_config: Writer, tmp_path: Path, host: dict) -> None:
    config = write_config(
        f'[metrics]\ntls_cert_file = "{tmp_path}/cert.pem"\ntls_key_file = "{host["token"]}"\n'
        f'[caches.m]\nbackend = "nix-copy"\nuri = "file://{tmp_path}/c"\n'
    )
    assert problems(config) == [
        f"{config}:metrics.tls_cert_file: cannot read {tmp_path}/cert.pem: No such file or "
        "directory"
    ]


@pytest.mark.parametrize(
    ("uri", "directory"),
    [
        ("file:///srv/cache", Path("/srv/cache")),
        ("file:///srv/my%20cache?compression=zstd", Path("/srv/my cache")),
        ("s3://bucket", None),
        ("ssh-ng://host", None),
        ("local", None),
    ],
)
def test_file_cache_directory(uri: str, directory: Path | None) -> None:
    from bridge.config import CacheConfig

    assert file_cache_directory(CacheConfig("m", "nix-copy", uri=uri)) == directory


def test_cachix_cache_has_no_directory() -> None:
    from bridge.config import CacheConfig

    assert file_cache_directory(CacheConfig("m", "cachix")) is None


def test_as_an_unprivileged_user(shared_tmp: Path) -> None:
    """As `nobody`: a root-only secret and an unwritable cache directory are reported."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    secret = shared_tmp / "token"
    secret.write_text("t0ken\n")
    secret.chmod(0o600)
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o755)
    state = shared_tmp / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    config = shared_tmp / "bridge.toml"
    config.write_text(
        f'state_dir = "{state}"\n'
        f'[caches.team]\nbackend = "cachix"\nexecutable = "/bin/true"\n'
        f'auth_token_file = "{secret}"\n'
        f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{cache}/sub"\n'
        f'[caches.open]\nbackend = "nix-copy"\nuri = "file://{state}/cache"\n'
    )
    loaded = load_config(config)
    found = run_as(NOBODY, NOBODY, lambda: check_host(loaded, {"PATH": "/usr/bin:/bin"}))
    assert found == [
        f"{config}:caches.team.auth_token_file: cannot read secret file {secret}: "
        "Permission denied",
        f"{config}:caches.mirror.uri: cannot create {cache}/sub (the binary cache): {cache} is "
        "not writable: permission denied for uid 65534 (mode 0755, owner 0:0)",
    ]
    assert check_host(loaded, {"PATH": "/usr/bin:/bin"}) == []  # root may do all of it
