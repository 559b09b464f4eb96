"""Secrets: the Cachix auth token and signing key never leak, and are handled as documented.

Real token and key files with distinctive random contents (`tok-SECRET-<hex>`,
`key-SECRET-<hex>`). Their contents (and their random parts alone) must never appear in the
daemon's log (at log_level debug, also when a push fails with the stand-in printing errors,
and when the backend executable dumps its whole environment), in `status` / `status --json`
(last_error of a dead letter), `check-config`, /metrics, quarantine `.reason` files, the
SQLite files, or exception messages. Secrets are read at push time (token rotation), given to
the child by environment only (its /proc cmdline and the stand-in's logged argv have none, its
/proc environ has them), and relative names resolve through $CREDENTIALS_DIRECTORY.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.backends import CachixBackend, NixCopyBackend
from bridge.config import CacheConfig, load_config
from bridge.render import render_config
from bridge.secrets import SecretError, read_secret
from tests.integration.daemonproc import DaemonProcess, bridge, enqueue_all, wait_for
from tests.nixhelpers import build, narinfo

PUSH_FAST = "[push]\nbackoff_initial_seconds = 0.2\nbackoff_max_seconds = 0.5\n"
STORE_PATH = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hello"
CHECKS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    report_dir = os.environ.get("RELIABILITY_REPORT_DIR")
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "secrets.json").write_text(
            json.dumps(
                {
                    "file": "tests/reliability/test_secrets.py",
                    "places_checked_for_secret_contents": dict(sorted(CHECKS.items())),
                },
                indent=2,
            )
        )


class Secrets:
    """Distinctive secret values, written to files, and the checks that they never leak."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.token = f"tok-SECRET-{secrets.token_hex(16)}"
        self.key = f"key-SECRET-{secrets.token_hex(16)}"
        self.dhall = f"dhall-SECRET-{secrets.token_hex(16)}"
        self.token_file = directory / "cachix-token"
        self.key_file = directory / "cachix-key"
        self.dhall_file = directory / "cachix.dhall"
        # Surrounding whitespace and a final newline, as files written by hand have.
        self.token_file.write_text(f"  {self.token}\n")
        self.key_file.write_text(f"{self.key}\n\n")
        self.dhall_file.write_text(f'{{ authToken = "{self.dhall}", binaryCaches = [] }}\n')
        for path in (self.token_file, self.key_file, self.dhall_file):
            path.chmod(0o600)
        self.values = [self.token, self.key, self.dhall]

    def needles(self) -> list[str]:
        """Each secret, and its random part alone (a partial leak is a leak too)."""
        return [*self.values, *(v.rsplit("-", 1)[1] for v in self.values)]

    def assert_absent(self, where: str, content: str | bytes) -> None:
        CHECKS[re.sub(r" \(.*\)$", "", where)] += 1
        for needle in self.needles():
            if isinstance(content, bytes):
                found = needle.encode() in content or needle.encode("utf-16-le") in content
            else:
                found = needle in content
            assert not found, f"secret {needle[:14]}… appears in {where}"


@pytest.fixture
def creds(tmp_path: Path) -> Secrets:
    return Secrets(tmp_path / "credentials")


def cachix_cache(name: str, creds: Secrets, *, executable: Path | None = None) -> str:
    body = (
        f'[caches.{name}]\nbackend = "cachix"\n'
        f'auth_token_file = "{creds.token_file}"\nsigning_key_file = "{creds.key_file}"\n'
    )
    if executable is not None:
        body += f'executable = "{executable}"\ncachix_config = "{creds.dhall_file}"\n'
    return body


def database_bytes(state: Path) -> bytes:
    return b"".join(
        p.read_bytes()
        for p in sorted(state.glob("queue.sqlite3*"))
        if p.is_file()  # the database, its WAL and shared-memory files
    )


def check_everywhere(daemon: DaemonProcess, creds: Secrets, state: Path) -> None:
    """Log, status (text and JSON), check-config, /metrics, .reason files and the database."""
    creds.assert_absent("daemon log", daemon.log())
    for args in (["status"], ["status", "--json"], ["status", "--dead-letters", "100"]):
        done = bridge(*args, "--config", str(daemon.config), env=daemon.env)
        assert done.returncode == 0, done.stderr
        creds.assert_absent(f"status output ({' '.join(args)})", done.stdout + done.stderr)
    done = bridge("check-config", "--config", str(daemon.config), env=daemon.env)
    assert done.returncode == 0, done.stderr
    creds.assert_absent("check-config output", done.stdout + done.stderr)
    creds.assert_absent("/metrics", daemon.metrics_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/", timeout=5) as page:
        creds.assert_absent("metrics landing page", page.read())
    creds.assert_absent("/healthz", daemon.health()[1])
    for reason in (state / "spool" / "quarantine").glob("*.reason"):
        creds.assert_absent(f"quarantine .reason files ({reason.name})", reason.read_bytes())
    creds.assert_absent("SQLite database files", database_bytes(state))


# ----------------------------------------------------------------------------- the daemon


ENV_DUMPER = """#!/bin/sh
# A backend executable that prints everything it was given, then fails.
echo "argv: $*" >&2
env >&2
cat >&2
echo "token=$CACHIX_AUTH_TOKEN key=$CACHIX_SIGNING_KEY" >&2
echo "again: ${CACHIX_AUTH_TOKEN}${CACHIX_SIGNING_KEY}"
exit 1
"""


def test_secrets_never_leak_when_the_backend_prints_its_whole_environment(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    creds: Secrets,
) -> None:
    """The executable dumps its environment (token and key included) and fails; the path
    is dead-lettered at once. Its redacted output is in the log (at debug), in last_error and
    in the dead letter; the secrets themselves are nowhere."""
    dumper = tmp_path / "env-dumper"
    dumper.write_text(ENV_DUMPER)
    dumper.chmod(0o755)
    daemon = daemon_factory(
        "[push]\nmax_attempts = 1\n" + cachix_cache("echo", creds, executable=dumper)
    )
    state = tmp_path / "state"
    # Producers that (by mistake or malice) drop copies and links of the token file into the
    # spool: they are quarantined, and their .reason files must not quote the content.
    incoming = state / "spool" / "incoming"
    # copyfile, not copy: the daemon may take the file before a later chmod could run.
    shutil.copyfile(creds.token_file, incoming / "token-copy.json")
    os.symlink(creds.token_file, incoming / "token-symlink.json")
    os.link(creds.key_file, incoming / "key-hardlink.json")
    (incoming / "key-in-json.json").write_text(json.dumps(creds.key))
    [built] = build(workdir, 1, prefix="hcb-secrets")
    enqueue_all(daemon, tmp_path, [built], 1)
    status = wait_for(
        lambda: (s := daemon.status())["dead_letters"] and s,
        timeout=60,
        message="the path to be dead-lettered",
    )
    [dead] = status["dead_letters"]
    assert dead["path"] == built.out
    # The dumped output really did contain the secrets: they were redacted, not absent.
    assert "[REDACTED]" in dead["error"], dead["error"]
    assert "token=[REDACTED] key=[REDACTED]" in dead["error"]
    [cache] = status["caches"]
    assert "[REDACTED]" in (cache["last_error"] or "")
    wait_for(
        lambda: len(list((state / "spool" / "quarantine").glob("*.reason"))) == 4,
        timeout=10,
        message="the token copies to be quarantined",
    )
    assert 'log_level = "debug"' in daemon.config.read_text()
    check_everywhere(daemon, creds, state)
    # After shutdown too (the WAL is checkpointed into the database file).
    assert daemon.terminate() == 0
    creds.assert_absent("daemon log after shutdown", daemon.log())
    creds.assert_absent("SQLite database files after shutdown", database_bytes(state))


def cachix_children(parent: int) -> list[int]:
    """Processes whose parent is `parent` and whose command line runs a `cachix`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"cachix" in cmdline:
            found.append(int(entry))
    return found


def test_token_is_read_at_push_time_and_passed_only_by_environment(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    creds: Secrets,
) -> None:
    """The stand-in only accepts a token the file does not hold yet: pushes fail (the
    stand-in prints errors and junk), then the file is rotated and the next push succeeds
    without a restart. While the stand-in runs, its /proc cmdline has no secret and its
    /proc environ has exactly the current token and key."""
    new_token = f"tok-SECRET-{secrets.token_hex(16)}"
    creds.values.append(new_token)
    daemon = daemon_factory(
        PUSH_FAST + "max_attempts = 100\n" + cachix_cache("team", creds),
        env={
            "FAKE_CACHIX_REQUIRE_TOKEN": new_token,
            "FAKE_CACHIX_REQUIRE_KEY": creds.key,
            "FAKE_CACHIX_SPAM_BYTES": "4000",
            "FAKE_CACHIX_SLEEP": "1.5",
        },
    )
    calls_log = tmp_path / "cachix-calls.jsonl"

    def calls() -> list[dict[str, object]]:
        if not calls_log.exists():
            return []
        return [json.loads(line) for line in calls_log.read_text().splitlines()]

    [built] = build(workdir, 1, prefix="hcb-rotate")
    enqueue_all(daemon, tmp_path, [built], 1)
    wait_for(lambda: len(calls()) >= 2, timeout=30, message="two refused pushes")
    assert all(c["exit"] == 1 for c in calls())
    creds.assert_absent("daemon log before rotation", daemon.log())
    status = daemon.status()
    assert "unauthorized" in (status["caches"][0]["last_error"] or "")
    # Rotate atomically, as credential managers do.
    staged = creds.directory / "cachix-token.new"
    staged.write_text(new_token + "\n")
    staged.replace(creds.token_file)

    seen: dict[int, tuple[bytes, bytes]] = {}
    deadline = time.monotonic() + 60
    while not narinfo(fake_cachix / "team", built).is_file():
        assert time.monotonic() < deadline, "push with the rotated token"
        for pid in cachix_children(daemon.proc.pid if daemon.proc else -1):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if b"CACHIX_AUTH_TOKEN=" in environ:
                seen[pid] = (cmdline, environ)
        time.sleep(0.05)
    assert seen, "never saw the stand-in cachix running"
    for cmdline, environ in seen.values():
        creds.assert_absent("/proc/<cachix>/cmdline", cmdline)
        variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
        assert variables[b"CACHIX_SIGNING_KEY"] == creds.key.encode()
        assert variables[b"CACHIX_AUTH_TOKEN"] in (creds.token.encode(), new_token.encode())
    assert any(
        dict(item.split(b"=", 1) for item in env.split(b"\0") if b"=" in item)[b"CACHIX_AUTH_TOKEN"]
        == new_token.encode()
        for _, env in seen.values()
    )
    # The stand-in logs its call when it ends, just after the narinfo is written.
    final = wait_for(
        lambda: (c := calls()) and c[-1]["exit"] == 0 and c,
        timeout=10,
        message="the successful call in the stand-in's log",
    )
    assert final[-1]["had_token"] and final[-1]["had_signing_key"]
    for call in final:
        creds.assert_absent("stand-in cachix argv", json.dumps(call["argv"]))
    check_everywhere(daemon, creds, tmp_path / "state")


def test_relative_secret_names_resolve_through_credentials_directory(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    creds: Secrets,
) -> None:
    """`auth_token_file = "cachix-token"` is a systemd credential name: with
    $CREDENTIALS_DIRECTORY set, the right token and key arrive; without it, check-config fails
    saying the name is relative (never the content)."""
    body = (
        '[caches.team]\nbackend = "cachix"\n'
        'auth_token_file = "cachix-token"\nsigning_key_file = "cachix-key"\n'
    )
    daemon = daemon_factory(
        body,
        env={
            "CREDENTIALS_DIRECTORY": str(creds.directory),
            "FAKE_CACHIX_REQUIRE_TOKEN": creds.token,
            "FAKE_CACHIX_REQUIRE_KEY": creds.key,
        },
    )
    [built] = build(workdir, 1, prefix="hcb-creds")
    enqueue_all(daemon, tmp_path, [built], 1)
    wait_for(
        lambda: narinfo(fake_cachix / "team", built).is_file(),
        timeout=60,
        message="push with credentials from $CREDENTIALS_DIRECTORY",
    )
    done = bridge("check-config", "--config", str(daemon.config), env=daemon.env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("readable; content not shown") == 2, done.stdout
    creds.assert_absent("check-config output", done.stdout)
    env = {k: v for k, v in daemon.env.items() if k != "CREDENTIALS_DIRECTORY"}
    done = bridge("check-config", "--config", str(daemon.config), env=env)
    # Without $CREDENTIALS_DIRECTORY the config cannot work: exit 1, naming the key.
    assert done.returncode == 1, done.stdout
    assert f"{daemon.config}:caches.team.auth_token_file: " in done.stderr
    assert "'cachix-token' is relative" in done.stderr
    creds.assert_absent(
        "check-config output without $CREDENTIALS_DIRECTORY", done.stdout + done.stderr
    )
    done = bridge("check-config", "--offline", "--config", str(daemon.config), env=env)
    assert done.returncode == 0, done.stderr
    assert "NOT READABLE" in done.stdout and "'cachix-token' is relative" in done.stdout
    creds.assert_absent("check-config --offline without $CREDENTIALS_DIRECTORY", done.stdout)
    check_everywhere(daemon, creds, tmp_path / "state")


def test_token_file_with_a_nul_byte_fails_the_push_with_backoff(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    creds: Secrets,
) -> None:
    """A corrupt token file (a NUL byte cannot be put into an environment variable) is a
    `secret` failure, retried with backoff and counted in the metrics, not an exception that
    puts the batch back at once to be retried in a busy loop."""
    creds.token_file.write_bytes(creds.token.encode() + b"\0garbage\n")
    daemon = daemon_factory(
        "[push]\nbackoff_initial_seconds = 5\nbackoff_max_seconds = 5\n"
        + cachix_cache("team", creds, executable=Path("/bin/true"))
    )
    [built] = build(workdir, 1, prefix="hcb-nul")
    enqueue_all(daemon, tmp_path, [built], 1)
    time.sleep(3)
    text = daemon.log()
    creds.assert_absent("daemon log", text)
    attempts = text.count("pushing 1 path(s) to team")
    failed = daemon.metric("hydra_cachix_bridge_pushes_failed_total", cache="team", reason="secret")
    assert attempts <= 2 and failed >= 1, (
        f"{attempts} push attempts in 3 s with a 5 s backoff, "
        f"pushes_failed_total{{reason=secret}} = {failed}; "
        f"{text.count('unexpected error pushing')} 'unexpected error' tracebacks logged"
    )


# ----------------------------------------------------------------------------- in process


def secret_error(path: Path) -> str:
    with pytest.raises(SecretError) as info:
        read_secret(path)
    return str(info.value)


def test_secret_errors_name_the_file_never_the_content(
    tmp_path: Path, creds: Secrets, monkeypatch: pytest.MonkeyPatch, shared_tmp: Path
) -> None:
    cases: dict[str, Path] = {}
    not_utf8 = tmp_path / "not-utf8"
    not_utf8.write_bytes(creds.token.encode() + b"\xff\xfe\n")
    cases["not UTF-8"] = not_utf8
    blank = tmp_path / "blank"
    blank.write_text(" \n\t\n")
    cases["empty"] = blank
    directory = tmp_path / "a-directory"
    directory.mkdir()
    (directory / "inside").write_text(creds.token)
    cases["directory"] = directory
    cases["missing"] = tmp_path / "missing"
    for kind, path in cases.items():
        message = secret_error(path)
        assert str(path) in message, (kind, message)
        creds.assert_absent(f"SecretError message ({kind})", message)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    message = secret_error(Path("cachix-token"))
    assert "'cachix-token'" in message and "CREDENTIALS_DIRECTORY" in message
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds.directory))
    assert read_secret(Path("cachix-token")) == creds.token

    # Unreadable for the reading user: read as nobody, a root-owned 0600 file.
    unreadable = shared_tmp / "root-only-token"
    # nobody may not enter the checkout (a clone under /root is root's alone): a copy.
    shutil.copytree(
        Path(__file__).parents[2] / "bridge",
        shared_tmp / "lib" / "bridge",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    unreadable.write_text(creds.token + "\n")
    unreadable.chmod(0o600)
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            "import sys\n"
            "from pathlib import Path\n"
            "from bridge.secrets import SecretError, read_secret\n"
            "try:\n"
            "    read_secret(Path(sys.argv[1]))\n"
            "except SecretError as exc:\n"
            "    print(exc)\n",
            str(unreadable),
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(shared_tmp / "lib")},
        cwd="/",
        check=False,
        timeout=30,
    )
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"cannot switch to user nobody: {done.stderr.strip()}")
    assert done.stdout.strip() == f"cannot read secret file {unreadable}: Permission denied", (
        done.stdout + done.stderr
    )
    creds.assert_absent("SecretError message (permission denied)", done.stdout + done.stderr)


def test_push_outcomes_and_check_config_do_not_show_secret_contents(
    tmp_path: Path, creds: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backends fed unreadable secrets fail with the file name; check-config only says
    whether each secret file is readable."""
    cancel = threading.Event()
    broken = tmp_path / "broken-token"
    broken.write_bytes(creds.token.encode() + b"\xff")
    cachix = CachixBackend(
        CacheConfig(name="c", backend="cachix", executable="/bin/true", auth_token_file=broken)
    )
    outcome = cachix.push([STORE_PATH], 10, cancel)
    assert not outcome.ok and outcome.reason == "secret"
    assert str(broken) in (outcome.error or "")
    creds.assert_absent("PushOutcome.error", outcome.error or "")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    relative = CachixBackend(
        CacheConfig(
            name="c",
            backend="cachix",
            executable="/bin/true",
            auth_token_file=Path("cachix-token"),
        )
    )
    outcome = relative.push([STORE_PATH], 10, cancel)
    assert outcome.reason == "secret" and "'cachix-token'" in (outcome.error or "")
    # nix copy: the key file's path goes into the URI, never its content.
    nix_copy = NixCopyBackend(
        CacheConfig(name="m", backend="nix-copy", uri="file:///x", signing_key_file=creds.key_file)
    )
    assert nix_copy.destination() == f"file:///x?secret-key={creds.key_file}"
    creds.assert_absent("nix copy argv", json.dumps(nix_copy.command([STORE_PATH])))
    config_file = tmp_path / "bridge.toml"
    config_file.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        + cachix_cache("c", creds, executable=Path("/bin/true"))
        + f'[caches.m]\nbackend = "nix-copy"\nuri = "file:///x"\n'
        f'signing_key_file = "{creds.key_file}"\n'
    )
    rendered = render_config(load_config(config_file))
    assert rendered.count("readable; content not shown") == 4, rendered
    creds.assert_absent("check-config rendering", rendered)


@pytest.mark.parametrize(
    "script",
    [
        # The secrets glued to other text, on stdout and stderr, several times.
        'printf "xx%syy%szz\\n" "$CACHIX_AUTH_TOKEN" "$CACHIX_SIGNING_KEY"; '
        'echo "$CACHIX_AUTH_TOKEN$CACHIX_SIGNING_KEY" >&2; exit 3',
        # A line of over 1,000 characters ending in the secret: redaction before the cut.
        'printf "%01200d%s\\n" 0 "$CACHIX_AUTH_TOKEN"; exit 1',
        # More than the 64 KiB kept of the output, the cut falling inside the token.
        "head -c 70000 /dev/zero | tr '\\0' a; "
        'printf "%s\\n%s\\n" "$CACHIX_AUTH_TOKEN" "$CACHIX_SIGNING_KEY"; exit 1',
        # The same, with the cut exactly inside the token (see the test).
        "CUT",
        # Killed by a signal after printing.
        'echo "$CACHIX_AUTH_TOKEN"; kill -9 $$',
    ],
    ids=["glued", "long-line", "64k-tail", "cut-in-token", "signal"],
)
def test_backend_output_is_redacted_however_the_secret_is_printed(
    tmp_path: Path, creds: Secrets, script: str
) -> None:
    if script == "CUT":
        # Exactly 64 KiB + 20 bytes of output, so that the kept tail starts 20 bytes into
        # the token: the cut line must be dropped, not kept as an unredactable fragment.
        token_line = creds.token + "\n"
        filler = 65536 + 20 - len(token_line) - 1
        script = (
            'printf "%s\\n" "$CACHIX_AUTH_TOKEN"; '
            f"head -c {filler} /dev/zero | tr '\\0' b; echo; exit 1"
        )
    executable = tmp_path / "printer"
    executable.write_text("#!/bin/sh\n" + script + "\n")
    executable.chmod(0o755)
    cache = CacheConfig(
        name="c",
        backend="cachix",
        executable=str(executable),
        auth_token_file=creds.token_file,
        signing_key_file=creds.key_file,
    )
    outcome = CachixBackend(cache).push([STORE_PATH], 30, threading.Event())
    assert not outcome.ok
    creds.assert_absent(f"PushOutcome.error ({outcome.reason})", outcome.error or "")


def test_redaction_when_one_secret_contains_the_other(tmp_path: Path) -> None:
    """If the token is a prefix of the signing key, redacting the token first must not leave
    the rest of the key in the output."""
    token = f"tok-SECRET-{secrets.token_hex(8)}"
    key = f"{token}-and-then-the-KEY-{secrets.token_hex(8)}"
    (tmp_path / "t").write_text(token)
    (tmp_path / "k").write_text(key)
    executable = tmp_path / "printer"
    executable.write_text('#!/bin/sh\necho "key=$CACHIX_SIGNING_KEY"\nexit 1\n')
    executable.chmod(0o755)
    cache = CacheConfig(
        name="c",
        backend="cachix",
        executable=str(executable),
        auth_token_file=tmp_path / "t",
        signing_key_file=tmp_path / "k",
    )
    outcome = CachixBackend(cache).push([STORE_PATH], 30, threading.Event())
    CHECKS["PushOutcome.error"] += 1
    assert key.split("-and-then-", 1)[1] not in (outcome.error or ""), outcome.error
