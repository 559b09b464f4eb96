"""bridge/backends.py: cachix (the stand-in on PATH) and nix copy, both for real."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bridge.backends import CachixBackend, NixCopyBackend, PushOutcome, cachix_skipped, make_backend
from bridge.config import CacheConfig
from exporter.vocabulary import FailureReason
from tests.nixhelpers import Built, build, narinfo, offline_env

pytestmark = pytest.mark.nix

TOKEN = "tok-0f1e2d3c4b5a69788796a5b4c3d2e1f0-secret"
KEY = "sk-ZmFrZSBzaWduaW5nIGtleSBmb3IgdGVzdHMgb25seQ-secret"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> list[Built]:
    return build(tmp_path_factory.mktemp("backends-nix"), 3, prefix="hcb-backend")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "cachix-token"
    path.parent.mkdir(exist_ok=True)
    path.write_text(TOKEN + "\n")
    return path


def push(
    backend: CachixBackend | NixCopyBackend, paths: list[str], timeout: float = 60
) -> PushOutcome:
    return backend.push(paths, timeout, threading.Event())


def calls(tmp_path: Path) -> list[dict[str, object]]:
    log = tmp_path / "cachix-calls.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def processes_with_env(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment contains marker."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] in "ZX":
            continue
        if marker.encode() in environ.split(b"\0"):
            found.append(int(entry))
    return found


# -- command line ------------------------------------------------------------------------


def test_cachix_command_minimal() -> None:
    backend = CachixBackend(CacheConfig(name="mycache", backend="cachix"))
    assert backend.command() == ["cachix", "push", "mycache"]
    assert backend.name == "mycache"


def test_cachix_command_with_every_option(tmp_path: Path) -> None:
    config = tmp_path / "cachix.dhall"
    cache = CacheConfig(
        name="my-cache",
        backend="cachix",
        cachix_config=config,
        hostname="https://cachix.example.org",
        extra_args=("-j", "2", "--compression-method", "xz", "--omit-deriver"),
        executable="/opt/bin/cachix",
    )
    args = CachixBackend(cache).command()
    assert isinstance(args, list)
    assert args == [
        "/opt/bin/cachix",
        "-c",
        str(config),
        "--hostname",
        "https://cachix.example.org",
        "push",
        "-j",
        "2",
        "--compression-method",
        "xz",
        "--omit-deriver",
        "my-cache",
    ]


def test_cachix_command_arguments_are_never_one_shell_string() -> None:
    cache = CacheConfig(
        name="c", backend="cachix", extra_args=("--jobs", "4; rm -rf /"), hostname="https://h"
    )
    args = CachixBackend(cache).command()
    # Every value is its own argv element, passed as is.
    assert "4; rm -rf /" in args
    assert args[-1] == "c"
    assert not any(arg.startswith(("sh", "/bin/sh", "bash")) for arg in args)


def test_cachix_config_relative_name_is_found_in_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    backend = CachixBackend(
        CacheConfig(name="c", backend="cachix", cachix_config=Path("cachix.dhall"))
    )
    assert backend.command()[:3] == ["cachix", "-c", str(tmp_path / "creds" / "cachix.dhall")]


# -- cachix pushes with the stand-in -----------------------------------------------------


def test_cachix_push_arrives_in_the_cache(
    fake_cachix: Path, built: list[Built], token_file: Path, tmp_path: Path
) -> None:
    backend = CachixBackend(
        CacheConfig(name="mycache", backend="cachix", auth_token_file=token_file)
    )
    outcome = push(backend, [b.out for b in built])
    assert outcome == PushOutcome(ok=True, duration=outcome.duration)
    assert outcome.duration > 0
    for b in built:
        info = narinfo(fake_cachix / "mycache", b)
        assert info.exists()
        assert f"StorePath: {b.out}" in info.read_text()
    (call,) = calls(tmp_path)
    assert call["argv"] == ["push", "mycache"]
    assert call["paths"] == [b.out for b in built]  # given on stdin, in order
    assert call["had_token"] is True
    assert call["exit"] == 0


def test_cachix_secrets_are_read_from_files_at_push_time(
    fake_cachix: Path,
    built: list[Built],
    token_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = CachixBackend(
        CacheConfig(name="rotating", backend="cachix", auth_token_file=token_file)
    )
    monkeypatch.setenv("FAKE_CACHIX_REQUIRE_TOKEN", TOKEN)
    assert push(backend, [built[0].out]).ok

    token_file.write_text("tok-rotated-value\n")
    rejected = push(backend, [built[1].out])
    assert not rejected.ok
    assert rejected.reason == "exit_status"
    assert rejected.error is not None and "unauthorized" in rejected.error
    assert "tok-rotated-value" not in rejected.error

    monkeypatch.setenv("FAKE_CACHIX_REQUIRE_TOKEN", "tok-rotated-value")
    assert push(backend, [built[1].out]).ok
    assert narinfo(fake_cachix / "rotating", built[1]).exists()


def test_cachix_signing_key_file_is_used(
    fake_cachix: Path, built: list[Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "signing-key"
    key_file.write_text(KEY)
    backend = CachixBackend(CacheConfig(name="signed", backend="cachix", signing_key_file=key_file))
    monkeypatch.setenv("FAKE_CACHIX_REQUIRE_KEY", KEY)
    assert push(backend, [built[0].out]).ok
    key_file.write_text("sk-another-key")
    failed = push(backend, [built[0].out])
    assert failed.reason == "exit_status"
    assert failed.error is not None and "signing key does not match" in failed.error
    (first, second) = calls(tmp_path)
    assert first["had_signing_key"] is True and first["had_token"] is False
    assert second["exit"] == 1


def test_relative_secret_names_resolve_in_credentials_directory(
    fake_cachix: Path, built: list[Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "token").write_text(TOKEN)
    (creds / "key").write_text(KEY)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("FAKE_CACHIX_REQUIRE_TOKEN", TOKEN)
    monkeypatch.setenv("FAKE_CACHIX_REQUIRE_KEY", KEY)
    monkeypatch.chdir(tmp_path)  # a cwd-relative "token" would not exist
    backend = CachixBackend(
        CacheConfig(
            name="creds",
            backend="cachix",
            auth_token_file=Path("token"),
            signing_key_file=Path("key"),
        )
    )
    outcome = push(backend, [built[0].out])
    assert outcome.ok, outcome.error
    assert narinfo(fake_cachix / "creds", built[0]).exists()


def test_cachix_config_file_supplies_the_token(
    fake_cachix: Path, built: list[Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "cachix.dhall").write_text(
        '{ authToken = "dhall-token", hostname = "https://cachix.example.org",'
        " binaryCaches = [] : List { name : Text, secretKey : Text } }\n"
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("FAKE_CACHIX_REQUIRE_TOKEN", "dhall-token")
    monkeypatch.delenv("CACHIX_AUTH_TOKEN", raising=False)
    backend = CachixBackend(
        CacheConfig(name="viaconfig", backend="cachix", cachix_config=Path("cachix.dhall"))
    )
    outcome = push(backend, [built[0].out])
    assert outcome.ok, outcome.error
    (call,) = calls(tmp_path)
    assert call["config"] == str(creds / "cachix.dhall")
    assert call["hostname"] == "https://cachix.example.org"
    assert narinfo(fake_cachix / "viaconfig", built[0]).exists()


def test_secret_values_never_appear_in_the_error(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    leaky = executable(
        tmp_path / "leaky-cachix",
        'echo "using token $CACHIX_AUTH_TOKEN" >&2\n'
        'echo "and key=$CACHIX_SIGNING_KEY, token again:$CACHIX_AUTH_TOKEN"\n'
        "exit 1\n",
    )
    backend = CachixBackend(
        CacheConfig(
            name="c",
            backend="cachix",
            auth_token_file=token_file,
            signing_key_file=key_file,
            executable=str(leaky),
        )
    )
    outcome = push(backend, ["/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x"])
    assert not outcome.ok
    assert outcome.reason == "exit_status"
    assert outcome.error is not None
    assert TOKEN not in outcome.error
    assert KEY not in outcome.error
    assert outcome.error.count("[REDACTED]") == 3
    assert outcome.error.startswith("cachix push exited 1:")


def test_secret_is_not_leaked_partially_when_the_output_is_cut(tmp_path: Path) -> None:
    """Redaction must happen before the error text is shortened, or a piece of it leaks."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    # One long line: the token, then 990 characters, so a 1000-character cut splits it.
    leaky = executable(
        tmp_path / "leaky-cachix",
        'printf "token=%s%0990d\\n" "$CACHIX_AUTH_TOKEN" 0 >&2\nexit 1\n',
    )
    backend = CachixBackend(
        CacheConfig(name="c", backend="cachix", auth_token_file=token_file, executable=str(leaky))
    )
    outcome = push(backend, ["/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x"])
    assert outcome.reason == "exit_status"
    assert outcome.error is not None
    pieces = {TOKEN[i : i + 8] for i in range(len(TOKEN) - 7)}
    leaked = sorted(p for p in pieces if p in outcome.error)
    assert leaked == [], f"parts of the token leaked into the error: {leaked}"


@pytest.mark.parametrize("problem", ["missing", "empty", "directory"])
def test_unreadable_secret_file_fails_with_reason_secret(
    fake_cachix: Path, tmp_path: Path, built: list[Built], problem: str
) -> None:
    path = tmp_path / "token"
    if problem == "empty":
        path.write_text("  \n")
    elif problem == "directory":
        path.mkdir()
    backend = CachixBackend(CacheConfig(name="c", backend="cachix", auth_token_file=path))
    outcome = push(backend, [built[0].out])
    assert outcome == PushOutcome(False, 0.0, "secret", outcome.error)
    assert outcome.error is not None and str(path) in outcome.error
    assert calls(tmp_path) == []  # cachix never ran


def test_cachix_failure_is_exit_status(
    fake_cachix: Path,
    built: list[Built],
    token_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_CACHIX_FAIL", "1")
    backend = CachixBackend(CacheConfig(name="c", backend="cachix", auth_token_file=token_file))
    outcome = push(backend, [built[0].out])
    assert (outcome.ok, outcome.reason, outcome.cancelled) == (False, "exit_status", False)
    assert outcome.error is not None
    assert outcome.error.startswith("cachix push exited 1: ")
    assert "injected failure" in outcome.error
    assert not (fake_cachix / "c").exists() or not narinfo(fake_cachix / "c", built[0]).exists()


def test_cachix_poison_path_fails_the_whole_push(
    fake_cachix: Path, built: list[Built], token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CACHIX_FAIL_PATHS", built[1].name)
    backend = CachixBackend(CacheConfig(name="c", backend="cachix", auth_token_file=token_file))
    outcome = push(backend, [b.out for b in built])
    assert outcome.reason == "exit_status"
    assert outcome.error is not None and "poison path" in outcome.error


def test_cachix_killed_by_signal(
    fake_cachix: Path, built: list[Built], token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CACHIX_CRASH", "1")
    backend = CachixBackend(CacheConfig(name="c", backend="cachix", auth_token_file=token_file))
    outcome = push(backend, [built[0].out])
    assert outcome.reason == "signal"
    assert outcome.error is not None and "cachix push killed by SIGSEGV" in outcome.error


def test_cachix_hang_times_out_and_the_group_is_killed(
    fake_cachix: Path, built: list[Built], token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CACHIX_HANG", "1")
    backend = CachixBackend(CacheConfig(name="c", backend="cachix", auth_token_file=token_file))
    started = time.monotonic()
    outcome = push(backend, [built[0].out], timeout=1.5)
    assert time.monotonic() - started < 8
    assert outcome.reason == "timeout"
    assert not outcome.cancelled
    assert outcome.error is not None
    assert "timed out" in outcome.error and "process group killed" in outcome.error
    assert "fake: hanging" in outcome.error  # the output tail is kept
    # Neither the fake nor the `sleep 3600` it started in its group is left running.
    marker = f"FAKE_CACHIX_ROOT={fake_cachix}"
    deadline = time.monotonic() + 5
    while processes_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with_env(marker) == []


def test_cachix_cancel_is_reported_as_cancelled(
    fake_cachix: Path, built: list[Built], token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CACHIX_HANG", "1")
    backend = CachixBackend(CacheConfig(name="c", backend="cachix", auth_token_file=token_file))
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    try:
        outcome = backend.push([built[0].out], 60, cancel)
    finally:
        timer.cancel()
    assert outcome.cancelled
    assert not outcome.ok
    assert outcome.reason == "timeout"


def test_missing_cachix_executable_is_a_spawn_error(tmp_path: Path, token_file: Path) -> None:
    backend = CachixBackend(
        CacheConfig(
            name="c",
            backend="cachix",
            auth_token_file=token_file,
            executable=str(tmp_path / "nowhere" / "cachix"),
        )
    )
    outcome = push(backend, ["/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x"])
    assert outcome.reason == "spawn_error"
    assert outcome.error is not None and "nowhere/cachix" in outcome.error


def test_every_failure_reason_is_in_the_bounded_set() -> None:
    assert set(FailureReason) >= {"exit_status", "signal", "timeout", "spawn_error", "secret"}


# -- nix copy ----------------------------------------------------------------------------


def test_nix_copy_pushes_real_paths(built: list[Built], tmp_path: Path) -> None:
    cache_dir = tmp_path / "binary-cache"
    backend = NixCopyBackend(
        CacheConfig(name="local", backend="nix-copy", uri=f"file://{cache_dir}")
    )
    assert backend.command(["/nix/store/a"])[-2:] == ["--", "/nix/store/a"]
    outcome = push(backend, [b.out for b in built[:2]])
    assert outcome.ok, outcome.error
    for b in built[:2]:
        text = narinfo(cache_dir, b).read_text()
        assert f"StorePath: {b.out}" in text
        assert "Sig:" not in text
    assert not narinfo(cache_dir, built[2]).exists()


def test_nix_copy_destination_adds_secret_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "dir with space" / "sk"
    plain = NixCopyBackend(
        CacheConfig(name="a", backend="nix-copy", uri="file:///c", signing_key_file=key)
    )
    assert plain.destination() == f"file:///c?secret-key={str(key).replace(' ', '%20')}"
    with_query = NixCopyBackend(
        CacheConfig(
            name="b", backend="nix-copy", uri="file:///c?compression=zstd", signing_key_file=key
        )
    )
    assert with_query.destination().startswith("file:///c?compression=zstd&secret-key=/")
    unsigned = NixCopyBackend(CacheConfig(name="u", backend="nix-copy", uri="s3://b?region=x"))
    assert unsigned.destination() == "s3://b?region=x"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/x")
    relative = NixCopyBackend(
        CacheConfig(name="r", backend="nix-copy", uri="file:///c", signing_key_file=Path("sk"))
    )
    assert relative.destination() == "file:///c?secret-key=/run/credentials/x/sk"


@pytest.mark.parametrize("query", ["", "?compression=zstd"])
def test_nix_copy_signs_with_the_key_file(built: list[Built], tmp_path: Path, query: str) -> None:
    keydir = tmp_path / "dir with space"
    keydir.mkdir()
    secret, public = keydir / "sk", tmp_path / "pk"
    subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "hcb-test-key-1", str(secret), str(public)],
        check=True,
        env=offline_env(),
    )
    cache_dir = tmp_path / "signed-cache"
    backend = NixCopyBackend(
        CacheConfig(
            name="signed",
            backend="nix-copy",
            uri=f"file://{cache_dir}{query}",
            signing_key_file=secret,
        )
    )
    outcome = push(backend, [built[2].out])
    assert outcome.ok, outcome.error
    text = narinfo(cache_dir, built[2]).read_text()
    assert "Sig: hcb-test-key-1:" in text
    if query:
        assert "Compression: zstd" in text


def test_nix_copy_failure_is_exit_status(tmp_path: Path) -> None:
    backend = NixCopyBackend(
        CacheConfig(name="local", backend="nix-copy", uri=f"file://{tmp_path / 'c'}")
    )
    outcome = push(backend, ["/nix/store/0123456789abcdfghijklmnpqrsvwxyz-never-built"])
    assert outcome.reason == "exit_status"
    assert outcome.error is not None and outcome.error.startswith("nix copy exited 1: ")


def test_make_backend_picks_by_backend_name() -> None:
    assert isinstance(make_backend(CacheConfig(name="c", backend="cachix")), CachixBackend)
    assert isinstance(
        make_backend(CacheConfig(name="n", backend="nix-copy", uri="file:///x")), NixCopyBackend
    )


def test_cachix_skipped_paths_are_read_from_its_warnings() -> None:
    a = "/nix/store/" + "a" * 32 + "-a"
    b = "/nix/store/" + "b" * 32 + "-b"
    other = "/nix/store/" + "c" * 32 + "-c"
    output = (
        f"Warning: {a} is not valid, skipping\n"
        "compressing and pushing ...\n"
        f"  Warning: {b} is not valid, skipping (indented: not cachix's line)\n"
        f"Warning: {other} is not valid, skipping\n"  # not part of this push
    )
    assert cachix_skipped(output, [a, b]) == frozenset({a})
    assert cachix_skipped("", [a]) == frozenset()


def test_every_backend_kind_has_its_spec() -> None:
    from bridge.backends import BACKEND_KINDS, CachixBackend, NixCopyBackend
    from exporter.vocabulary import BackendKind

    assert set(BACKEND_KINDS) == set(BackendKind)
    assert BACKEND_KINDS[BackendKind.CACHIX].make is CachixBackend
    assert BACKEND_KINDS[BackendKind.NIX_COPY].make is NixCopyBackend
    # cachix skips a path that is not valid and exits 0; nix copy fails on it.
    assert BACKEND_KINDS[BackendKind.CACHIX].skips_invalid
    assert not BACKEND_KINDS[BackendKind.NIX_COPY].skips_invalid
    assert [BACKEND_KINDS[kind].executable for kind in BackendKind] == ["cachix", "nix"]
