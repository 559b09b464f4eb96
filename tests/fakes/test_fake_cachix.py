"""Checks of the fake `cachix` executable (tests/fakes/cachix) against a real, offline Nix.

Each upstream rule the stand-in follows (cachix v1.11.1, see tests/fakes/README.md) has a
test here whose docstring names the upstream source of the rule.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

FAKE = Path(__file__).resolve().parent / "cachix"
TOKEN = "tok-" + uuid.uuid4().hex
KEY = "key-" + uuid.uuid4().hex

pytestmark = [
    pytest.mark.nix,
    pytest.mark.skipif(
        shutil.which("nix-build") is None or shutil.which("nix") is None,
        reason="needs Nix (nix-build, nix, nix-store)",
    ),
]


def offline_nix_config() -> str:
    current = os.environ.get("NIX_CONFIG")
    return f"{current}\nsubstituters =" if current else "substituters ="


def nix_build(expr_file: Path) -> str:
    env = {**os.environ, "NIX_CONFIG": offline_nix_config()}
    out = subprocess.run(
        ["nix-build", str(expr_file), "--option", "substituters", "", "--no-out-link"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Build a dependency and a path referring to it; return (dep, top). New every run."""
    d = tmp_path_factory.mktemp("drv")
    nonce = f"{uuid.uuid4().hex}{time.time_ns()}"
    (d / "x.nix").write_text(
        f"""
        let dep = derivation {{
          name = "t-dep-{nonce}"; system = builtins.currentSystem;
          builder = "/bin/sh"; args = [ "-c" "echo hi > $out" ];
        }};
        in derivation {{
          name = "t-{nonce}"; system = builtins.currentSystem;
          builder = "/bin/sh"; args = [ "-c" "echo ${{dep}} > $out" ];
        }}
        """
    )
    top = nix_build(d / "x.nix")
    dep = Path(top).read_text().strip()
    assert dep.startswith("/nix/store/") and f"t-dep-{nonce}" in dep
    return dep, top


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CACHIX_", "FAKE_CACHIX_")) and k != "NIX_CONFIG"
    }
    base.update(
        HOME=str(tmp_path / "home"),
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),
        NIX_CONFIG=offline_nix_config(),
        FAKE_CACHIX_ROOT=str(tmp_path / "root"),
        FAKE_CACHIX_LOG=str(tmp_path / "log.jsonl"),
    )
    return base


def run(
    args: list[str], env: dict[str, str], stdin: str = "", **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FAKE), *args],
        env={**env, **extra},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def narinfo(env: dict[str, str], cache: str, path: str) -> Path:
    return Path(env["FAKE_CACHIX_ROOT"]) / cache / f"{Path(path).name[:32]}.narinfo"


def log_lines(env: dict[str, str]) -> list[dict[str, object]]:
    log = Path(env["FAKE_CACHIX_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def assert_no_secrets(env: dict[str, str], *texts: str) -> None:
    blob = "".join(texts) + Path(env["FAKE_CACHIX_LOG"]).read_text()
    assert TOKEN not in blob
    assert KEY not in blob


def assert_nothing_copied(env: dict[str, str], cache: str = "c") -> None:
    cache_dir = Path(env["FAKE_CACHIX_ROOT"]) / cache
    assert not list(cache_dir.glob("*.narinfo"))


def test_push_args_copies_closure(built: tuple[str, str], env: dict[str, str]) -> None:
    dep, top = built
    r = run(["push", "-j", "4", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    for p in (top, dep):
        info = narinfo(env, "c", p)
        assert info.is_file()
        assert f"StorePath: {p}\n" in info.read_text()
    assert "Compression: zstd" in narinfo(env, "c", top).read_text()  # cachix's default
    assert "Pushing 2 paths (0 are already present)" in r.stderr  # progress on stderr
    assert "All done." in r.stderr
    [entry] = log_lines(env)
    assert entry["exit"] == 0 and entry["cache"] == "c" and entry["paths"] == [top]
    assert entry["had_token"] is True and entry["had_signing_key"] is False
    assert entry["pgid"] == os.getpgid(0)  # same group as its caller
    assert_no_secrets(env, r.stdout, r.stderr)
    # a second push finds everything present
    r = run(["push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0
    assert "Nothing to push - all store paths are already on Cachix." in r.stderr
    assert "Pushing" not in r.stderr


def test_push_stdin_with_signing_key_and_options(
    built: tuple[str, str], env: dict[str, str]
) -> None:
    _, top = built
    args = ["push", "--compression-method=xz", "-l9", "--omit-deriver", "cs"]
    r = run(args, env, stdin=f"\n  {top}\t\n", CACHIX_SIGNING_KEY=KEY)
    assert r.returncode == 0, r.stderr
    text = narinfo(env, "cs", top).read_text()
    assert f"StorePath: {top}\n" in text
    assert "Compression: xz" in text and "Deriver:" not in text
    [entry] = log_lines(env)
    assert entry["paths"] == [top] and entry["had_signing_key"] is True
    assert_no_secrets(env, r.stdout, r.stderr)


def test_empty_stdin_pushes_nothing(env: dict[str, str]) -> None:
    r = run(["push", "c"], env, stdin="", CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    assert_nothing_copied(env)


def test_missing_credentials(built: tuple[str, str], env: dict[str, str]) -> None:
    _, top = built
    r = run(["push", "c", top], env)
    assert r.returncode == 1
    assert "CACHIX_AUTH_TOKEN" in r.stderr
    assert_nothing_copied(env)
    [entry] = log_lines(env)
    assert entry["exit"] == 1 and entry["had_token"] is False


def test_config_file_credentials(
    built: tuple[str, str], env: dict[str, str], tmp_path: Path
) -> None:
    _, top = built
    cfg = tmp_path / "cachix.dhall"
    cfg.write_text(
        "-- written by a test\n"
        f'{{ authToken = "{TOKEN}" -- the token\n'
        ', hostname = "https://cachix.example.org"\n'
        f', binaryCaches = [ {{ name = "other", secretKey = "nope" }},'
        f' {{ name = "c", secretKey = "{KEY}" }} ]\n'
        "}\n"
    )
    r = run(
        ["-c", str(cfg), "push", "c", top],
        env,
        FAKE_CACHIX_REQUIRE_TOKEN=TOKEN,
        FAKE_CACHIX_REQUIRE_KEY=KEY,
    )
    assert r.returncode == 0, r.stderr
    assert narinfo(env, "c", top).is_file()
    [entry] = log_lines(env)
    assert entry["config"] == str(cfg)
    assert entry["hostname"] == "https://cachix.example.org"
    assert entry["had_token"] is True and entry["had_signing_key"] is True
    assert_no_secrets(env, r.stdout, r.stderr)
    # --hostname wins over the config; only the token applies to a cache not listed
    r = run(["--config", str(cfg), "--hostname", "https://h.test", "push", "x", top], env)
    assert r.returncode == 0, r.stderr
    entry = log_lines(env)[-1]
    assert entry["hostname"] == "https://h.test" and entry["had_signing_key"] is False


def test_missing_config_file(built: tuple[str, str], env: dict[str, str], tmp_path: Path) -> None:
    """Config.hs readConfig: `Safe.tryIO` around readFile, so a missing -c file means defaults."""
    _, top = built
    r = run(["-c", str(tmp_path / "nope.dhall"), "push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    assert narinfo(env, "c", top).is_file()
    entry = log_lines(env)[-1]
    assert entry["config"] is None and entry["hostname"] == "https://cachix.org"
    # the defaults hold no credentials: without the environment there is nothing to push with
    r = run(["-c", str(tmp_path / "nope.dhall"), "push", "c", top], env)
    assert r.returncode == 1 and "no credentials" in r.stderr


@pytest.mark.parametrize("kind", ["directory", "unreadable", "not-utf8"])
def test_unreadable_config_file_uses_defaults(
    built: tuple[str, str], env: dict[str, str], tmp_path: Path, kind: str
) -> None:
    """Config.hs readConfig: every IO error reading the file (not just ENOENT) gives defaults."""
    _, top = built
    cfg = tmp_path / "cachix.dhall"
    if kind == "directory":
        cfg.mkdir()
    elif kind == "unreadable":
        cfg.write_text('{ authToken = "x", binaryCaches = [] : List {} }')
        cfg.chmod(0)
        if os.access(cfg, os.R_OK):
            pytest.skip("running as root: file permissions do not stop reading")
    else:
        cfg.write_bytes(b'{ authToken = "\xff\xfe" }')
    r = run(["-c", str(cfg), "push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    assert narinfo(env, "c", top).is_file()


def test_unparsable_config_file_fails(
    built: tuple[str, str], env: dict[str, str], tmp_path: Path
) -> None:
    """Config.hs readConfig: a file that reads but is not dhall is an error (not an IO error)."""
    _, top = built
    cfg = tmp_path / "cachix.dhall"
    cfg.write_text("this is not dhall")
    r = run(["-c", str(cfg), "push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 1 and str(cfg) in r.stderr
    assert_nothing_copied(env)


def test_outage_file(built: tuple[str, str], env: dict[str, str], tmp_path: Path) -> None:
    """Test-only: FAKE_CACHIX_DOWN_FILE fails every push while the file exists."""
    _, top = built
    down = tmp_path / "down"
    down.touch()
    r = run(["push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN, FAKE_CACHIX_DOWN_FILE=str(down))
    assert r.returncode == 1 and "ConnectionFailure" in r.stderr
    assert_nothing_copied(env)
    down.unlink()
    r = run(["push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN, FAKE_CACHIX_DOWN_FILE=str(down))
    assert r.returncode == 0, r.stderr
    assert narinfo(env, "c", top).is_file()


def test_injected_failure(built: tuple[str, str], env: dict[str, str]) -> None:
    _, top = built
    r = run(["push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN, FAKE_CACHIX_FAIL="1")
    assert r.returncode == 1 and "injected" in r.stderr
    assert_nothing_copied(env)
    assert log_lines(env)[0]["exit"] == 1


def test_poison_path(built: tuple[str, str], env: dict[str, str]) -> None:
    dep, top = built
    poison = Path(top).name[33:]  # t-<nonce>
    r = run(
        ["push", "c", dep, top],
        env,
        CACHIX_AUTH_TOKEN=TOKEN,
        FAKE_CACHIX_FAIL_PATHS=f"no-such-thing,{poison}",
    )
    assert r.returncode == 1 and "poison" in r.stderr and top in r.stderr
    assert_nothing_copied(env)


def test_fail_count(built: tuple[str, str], env: dict[str, str], tmp_path: Path) -> None:
    _, top = built
    extra = {
        "CACHIX_AUTH_TOKEN": TOKEN,
        "FAKE_CACHIX_FAIL_COUNT_FILE": str(tmp_path / "count"),
        "FAKE_CACHIX_FAIL_TIMES": "2",
    }
    codes = [run(["push", "c", top], env, **extra).returncode for _ in range(3)]
    assert codes == [1, 1, 0]
    assert narinfo(env, "c", top).is_file()


def test_crash(built: tuple[str, str], env: dict[str, str]) -> None:
    _, top = built
    r = run(["push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN, FAKE_CACHIX_CRASH="1")
    assert r.returncode == -signal.SIGSEGV
    assert_nothing_copied(env)


def test_require_token_mismatch(built: tuple[str, str], env: dict[str, str]) -> None:
    _, top = built
    r = run(["push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN, FAKE_CACHIX_REQUIRE_TOKEN=KEY)
    assert r.returncode == 1 and "unauthorized" in r.stderr
    assert_nothing_copied(env)
    assert_no_secrets(env, r.stdout, r.stderr)
    r = run(["push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN, FAKE_CACHIX_REQUIRE_KEY=KEY)
    assert r.returncode == 1 and "unauthorized" in r.stderr


@pytest.mark.parametrize(
    ("bad", "warning"),
    [
        ("/tmp/not-a-store-path", ": error: getting status of '/tmp/not-a-store-path'"),
        ("/nix/store/tooshort-x", ": error: 'tooshort-x' is too short"),
        ("/nix/store/" + "e" * 32 + "-x", ": error: store path"),  # 'e' is not base-32
        ("/nix/store/" + "a" * 32 + "-x/bin/sh", " is not valid"),
    ],
)
def test_non_store_path_is_skipped(
    built: tuple[str, str], env: dict[str, str], bad: str, warning: str
) -> None:
    """CNix.hs resolveStorePaths + logStorePathWarning (Push.hs push): warn, skip, push the rest.

    A path that does not resolve to a store path gives `Warning: <path>: <Nix's error>,
    skipping`; one inside a store path stands for that store path (here not valid).
    """
    dep, top = built
    r = run(["push", "c", top, bad], env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    assert f"Warning: {bad}{warning}" in r.stderr
    assert r.stderr.count("skipping") == 1
    assert narinfo(env, "c", top).is_file() and narinfo(env, "c", dep).is_file()
    assert log_lines(env)[-1]["valid_paths"] == [top]


def test_invalid_path_skipped_with_exit_0(built: tuple[str, str], env: dict[str, str]) -> None:
    """CNix.hs validateStorePath: a store path not valid locally (garbage-collected, never
    built) gives `Warning: <path> is not valid, skipping`; the others are pushed, exit 0."""
    dep, top = built
    missing = "/nix/store/" + "0" * 32 + "-never-built"
    r = run(["push", "c"], env, stdin=f"{missing}\n{top}\n", CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    assert f"Warning: {missing} is not valid, skipping" in r.stderr
    assert narinfo(env, "c", top).is_file() and narinfo(env, "c", dep).is_file()
    assert not narinfo(env, "c", missing).exists()


def test_only_invalid_paths_is_success(env: dict[str, str]) -> None:
    """Push.hs push: with every path skipped nothing is pushed and the exit status is 0."""
    missing = "/nix/store/" + "0" * 32 + "-never-built"
    r = run(["push", "c"], env, stdin=missing, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    assert f"Warning: {missing} is not valid, skipping" in r.stderr
    assert "Nothing to push - all store paths are already on Cachix." in r.stderr
    assert_nothing_copied(env)


def test_symlink_and_subpath_resolve_to_store_path(
    built: tuple[str, str], env: dict[str, str], tmp_path: Path
) -> None:
    """CNix.hs resolveStorePath (Nix followLinksToStorePath): `./result` and a file inside a
    store path push that store path."""
    _, top = built
    link = tmp_path / "result"
    link.symlink_to(top)
    r = run(["push", "c", str(link)], env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    assert log_lines(env)[-1]["valid_paths"] == [top]
    r = run(["push", "c2", f"{top}/"], env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 0, r.stderr
    assert narinfo(env, "c2", top).is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["push", "--bogus", "c"],
        ["--bogus", "push", "c"],
        ["push"],
        [],
        ["watch-store", "c"],
        ["push", "-m", "gzip", "c"],
        ["push", "-j", "many", "c"],
        ["push", "-l", "17", "c"],
        ["push", "-c"],
    ],
)
def test_usage_errors(env: dict[str, str], args: list[str]) -> None:
    r = run(args, env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 1 and r.stderr
    assert_nothing_copied(env)


def test_no_root(built: tuple[str, str], env: dict[str, str]) -> None:
    _, top = built
    del env["FAKE_CACHIX_ROOT"]
    r = run(["push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN)
    assert r.returncode == 1 and "FAKE_CACHIX_ROOT" in r.stderr


def test_spam(built: tuple[str, str], env: dict[str, str]) -> None:
    _, top = built
    r = run(["push", "c", top], env, CACHIX_AUTH_TOKEN=TOKEN, FAKE_CACHIX_SPAM_BYTES="200000")
    assert r.returncode == 0
    assert len(r.stderr) >= 200000


def group_members(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_hang_keeps_child_in_process_group(built: tuple[str, str], env: dict[str, str]) -> None:
    _, top = built
    proc = subprocess.Popen(
        [str(FAKE), "push", "c", top],
        env={**env, "CACHIX_AUTH_TOKEN": TOKEN, "FAKE_CACHIX_HANG": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def sleeping_child() -> bool:
        # Its `sleep`, not any child: the fake first resolves its paths with a short-lived
        # `nix-store` child, which a loaded machine lets the loop see.
        for pid in group_members(proc.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                    return True
        return False

    try:
        deadline = time.monotonic() + 60
        while not sleeping_child() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleeping_child(), "no child in the fake's process group"
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(proc.pid) == []
    assert_nothing_copied(env)
