"""The command line as users and Hydra call it: exit codes, messages, files written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bridge.config import load_config
from bridge.spool import SpoolLayout
from bridge.statedb import StateDb
from tests.nixhelpers import Built, hydra_payload

OUT = "/nix/store/2jmiqxxd2z4ypk8am71rc6kffqzgma57-t"
DRV = "/nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv"
ITEM = Built("t", DRV, OUT)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=60,
        check=False,
    )


def ready_spool(config: Path) -> SpoolLayout:
    layout = SpoolLayout(load_config(config).spool_dir)
    layout.ensure()
    return layout


def test_every_subcommand_has_help() -> None:
    for command in (
        "run",
        "enqueue-hydra",
        "enqueue-hook",
        "hook-script",
        "status",
        "retry",
        "check-config",
        "init",
        "demo",
    ):
        done = run(command, "--help")
        assert done.returncode == 0, command
        assert "Usage:" in done.stdout and "--help" in done.stdout


def test_console_script_and_module_agree() -> None:
    module = run("--version")
    assert module.returncode == 0 and "hydra-cachix-bridge, version" in module.stdout


def test_enqueue_hydra_records_payload_atomically(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    config = write_config('[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n')
    layout = ready_spool(config)
    payload = tmp_path / "hydra.json"
    payload.write_text(json.dumps({**hydra_payload(42, ITEM), "newField": {"ignored": True}}))
    done = run("enqueue-hydra", "--config", str(config), env={"HYDRA_JSON": str(payload)})
    assert done.returncode == 0, done.stderr
    assert "recorded build 42 (proj:main:pkg.x86_64-linux)" in done.stdout
    (event,) = list(layout.incoming.iterdir())
    doc = json.loads(event.read_text())
    assert doc["kind"] == "hydra" and doc["version"] == 1 and doc["payload"]["build"] == 42
    assert list(layout.tmp.iterdir()) == []


def test_enqueue_hydra_reads_config_from_environment(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    config = write_config('[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n')
    layout = ready_spool(config)
    payload = tmp_path / "hydra.json"
    payload.write_text(json.dumps(hydra_payload(1, ITEM)))
    done = run(
        "enqueue-hydra", env={"HYDRA_JSON": str(payload), "HYDRA_CACHIX_BRIDGE_CONFIG": str(config)}
    )
    assert done.returncode == 0, done.stderr
    assert len(list(layout.incoming.iterdir())) == 1


def test_enqueue_hydra_fails_visibly_when_spool_is_missing(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    config = write_config('[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n')
    payload = tmp_path / "hydra.json"
    payload.write_text(json.dumps(hydra_payload(1, ITEM)))
    done = run("enqueue-hydra", "--config", str(config), "--json-file", str(payload))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1
    assert "spool" in done.stderr and "missing" in done.stderr


def test_enqueue_hydra_without_payload_is_a_usage_error(write_config: Callable[..., Path]) -> None:
    config = write_config('[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n')
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_JSON"}
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "enqueue-hydra", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2 and "HYDRA_JSON" in done.stderr


def test_enqueue_hydra_quarantines_invalid_payload(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    config = write_config('[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n')
    layout = ready_spool(config)
    payload = tmp_path / "hydra.json"
    bad = hydra_payload(1, ITEM)
    bad["outputs"] = [{"name": "out", "path": "/etc/passwd; rm -rf /"}]
    payload.write_text(json.dumps(bad))
    done = run("enqueue-hydra", "--config", str(config), "--json-file", str(payload))
    assert done.returncode == 1
    assert "invalid_store_path" in done.stderr
    assert list(layout.incoming.iterdir()) == []
    saved = [p for p in layout.quarantine.iterdir() if not p.name.endswith(".reason")]
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == bad
    reason = json.loads(Path(f"{saved[0]}.reason").read_text())
    assert reason["reason"] == "invalid_store_path"


def test_enqueue_hook_always_exits_zero(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    config = write_config('[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n')
    env = {"DRV_PATH": DRV, "OUT_PATHS": OUT}
    missing = run("enqueue-hook", "--config", str(config), env=env)
    assert missing.returncode == 0 and "warning: build not recorded" in missing.stderr
    broken = run("enqueue-hook", "--config", str(tmp_path / "nope.toml"), env=env)
    assert broken.returncode == 0 and "not recorded" in broken.stderr
    layout = ready_spool(config)
    done = run("enqueue-hook", "--config", str(config), env=env)
    assert done.returncode == 0 and done.stderr == ""
    # Into the hook's own directory: only there do hook events count.
    (event,) = list(layout.hook.iterdir())
    assert event.read_bytes().endswith(b"\n")  # complete
    doc = json.loads(event.read_text())
    assert (doc["kind"], doc["drv_path"], doc["out_paths"]) == ("hook", DRV, OUT)


def test_check_config_reports_every_problem_with_file_and_key(
    write_config: Callable[..., Path],
) -> None:
    config = write_config(
        '[push]\nworkers = "four"\nbogus = 1\n'
        '[caches.c]\nbackend = "nix-copy"\n'
        '[[rules]]\ncaches = ["nope"]\njobs = ["a:b:c:d"]\n'
    )
    done = run("check-config", "--config", str(config))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert f"{config}:push.workers: must be an integer, got a string" in lines
    assert f"{config}:push.bogus: unknown key" in lines
    assert f"{config}:caches.c.uri: is required for backend nix-copy" in lines
    assert any(line.startswith(f"{config}:rules[0].caches: unknown cache 'nope'") for line in lines)
    assert any(line.startswith(f"{config}:rules[0].jobs: invalid job pattern") for line in lines)


def test_check_config_prints_effective_config_without_secrets(
    tmp_path: Path, write_config: Callable[..., Path], fake_cachix: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t-token-value\n")
    config = write_config(
        f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{token}"\n'
        '[caches.m]\nbackend = "nix-copy"\nuri = "https://cache.example/"\n'
    )
    done = run("check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "s3cr3t-token-value" not in done.stdout
    assert "readable; content not shown" in done.stdout
    assert 'uri = "https://cache.example/"' in done.stdout
    assert "[caches.team]" in done.stdout and "workers = 4" in done.stdout


def test_check_config_refuses_a_password_in_a_store_uri(
    write_config: Callable[..., Path],
) -> None:
    """Issue 11 finding 9 (before: accepted, the password reached nix's command line)."""
    config = write_config(
        '[caches.m]\nbackend = "nix-copy"\nuri = "https://user:hunter2@cache.example/"\n'
    )
    done = run("check-config", "--config", str(config))
    assert done.returncode != 0
    assert "hunter2" not in done.stdout + done.stderr
    assert f"{config}:caches.m.uri: holds a password" in done.stderr


def test_check_config_fails_when_the_config_cannot_work_here(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    config = write_config(
        f'[caches.team]\nbackend = "cachix"\nexecutable = "{tmp_path}/no-cachix"\n'
        f'auth_token_file = "{tmp_path}/missing-token"\n'
        f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{tmp_path}/cache"\n'
    )
    done = run("check-config", "--config", str(config))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{config}:caches.team.auth_token_file: cannot read secret file "
        f"{tmp_path}/missing-token: No such file or directory",
        f"{config}:caches.team.executable: {tmp_path}/no-cachix does not exist or is not a file",
    ]
    # --offline checks the file alone (for build-time checks such as the NixOS module's).
    offline = run("check-config", "--offline", "--config", str(config))
    assert offline.returncode == 0, offline.stderr
    assert "[caches.team]" in offline.stdout and "NOT READABLE" in offline.stdout


def test_check_config_rejects_signing_key_on_a_store_that_does_not_sign(
    write_config: Callable[..., Path],
) -> None:
    config = write_config(
        '[caches.mirror]\nbackend = "nix-copy"\nuri = "ssh-ng://builder"\n'
        'signing_key_file = "/etc/nix/mirror.key"\n'
    )
    for args in ([], ["--offline"]):
        done = run("check-config", *args, "--config", str(config))
        assert done.returncode == 1 and done.stdout == ""
        [line] = done.stderr.splitlines()
        assert line.startswith(f"{config}:caches.mirror.signing_key_file: Nix signs only when")


def test_check_config_warns_about_literal_stars(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    config = write_config(
        f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{tmp_path}/cache"\n'
        "[[rules]]\ncaches = ['c']\njobs = ['proj:release-*']\n"
    )
    done = run("check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"{config}:rules[0].jobs: warning: pattern 'proj:release-*': 'release-*' is matched "
        "literally, as Hydra does ('*' is a wildcard only as a whole part)"
    ]
    assert 'jobs = ["proj:release-*:*"]' in done.stdout


def test_status_and_retry(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    config = write_config('[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n')
    empty = run("status", "--json", "--config", str(config))
    assert empty.returncode == 0, empty.stderr
    doc = json.loads(empty.stdout)
    assert doc["daemon_running"] is False
    assert doc["caches"][0]["counts"] == {
        "pending": 0,
        "inflight": 0,
        "pushed": 0,
        "skipped": 0,
        "dead": 0,
    }
    db = load_config(config).database_path
    queue = StateDb(db)
    from bridge.events import Event

    now = time.time()
    with queue.transaction():
        queue.record_event(
            Event("hydra", now, (OUT,)),
            spool_name="a",
            outcome="matched",
            targets=[("c", OUT)],
            now=now,
        )
    (item,) = queue.claim("c", 10, now)
    queue.mark_failed(
        [([item], now)],
        reason="exit_status",
        error="cachix push exited 1: boom",
        max_attempts=1,
        now=now,
    )
    queue.close()

    text = run("status", "--config", str(config))
    assert text.returncode == 0
    assert "dead" in text.stdout and OUT in text.stdout and "boom" in text.stdout
    doc = json.loads(run("status", "--json", "--config", str(config)).stdout)
    assert doc["caches"][0]["counts"]["dead"] == 1
    dead_id = doc["dead_letters"][0]["id"]

    assert run("retry", "--config", str(config)).returncode == 2
    wrong = run("retry", "--config", str(config), "999")
    assert wrong.returncode == 1 and "0 dead-lettered path(s) queued again" in wrong.stdout
    done = run("retry", "--config", str(config), str(dead_id))
    assert done.returncode == 0 and "1 dead-lettered path(s) queued again" in done.stdout
    assert "the daemon is not running: they are pushed when it starts" in done.stdout
    assert "not running" not in wrong.stdout  # nothing was queued: nothing to wait for
    doc = json.loads(run("status", "--json", "--config", str(config)).stdout)
    assert doc["caches"][0]["counts"]["pending"] == 1 and doc["dead_letters"] == []


def test_hook_script_is_bound_to_configured_spool(write_config: Callable[..., Path]) -> None:
    config = write_config(
        'spool_dir = "/srv/my spool"\n[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n'
    )
    done = run("hook-script", "--config", str(config))
    assert done.returncode == 0
    assert done.stdout.startswith("#!/bin/sh\n")
    assert "dir='/srv/my spool/hook'" in done.stdout
    assert done.stdout.rstrip().endswith("exit 0")


def test_run_refuses_a_second_daemon_on_the_same_state(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    config = write_config(
        '[metrics]\nenabled = false\n[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n'
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        layout = SpoolLayout(load_config(config).spool_dir)
        deadline = time.monotonic() + 20
        while not (tmp_path / "state" / "daemon.lock").exists() or not layout.incoming.is_dir():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        second = run("run", "--config", str(config))
        assert second.returncode == 1
        assert "another hydra-cachix-bridge daemon is using" in second.stderr
        status = json.loads(run("status", "--json", "--config", str(config)).stdout)
        assert status["daemon_running"] is True
    finally:
        first.terminate()
        assert first.wait(timeout=30) == 0


def test_run_with_invalid_config_exits_1(write_config: Callable[..., Path]) -> None:
    config = write_config("[caches]\n")
    done = run("run", "--config", str(config))
    assert done.returncode == 1
    assert f"{config}:caches: at least one [caches.NAME] table is required" in done.stderr


def test_producers_do_not_import_the_daemon(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    """enqueue-hydra and enqueue-hook run in Hydra's and Nix's path: no heavy imports."""
    config = write_config('[caches.c]\nbackend = "nix-copy"\nuri = "file:///tmp/x"\n')
    ready_spool(config)
    payload = tmp_path / "hydra.json"
    payload.write_text(json.dumps(hydra_payload(1, ITEM)))
    probe = (
        "import sys\n"
        "from bridge.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = {'sqlite3', 'watchdog', 'prometheus_client', 'bridge.daemon', 'bridge.statedb',\n"
        "         'bridge.worker', 'exporter.metrics', 'subprocess'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    for args in (
        ["enqueue-hydra", "--config", str(config), "--json-file", str(payload)],
        ["enqueue-hook", "--config", str(config)],
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            text=True,
            env=dict(os.environ, DRV_PATH=DRV, OUT_PATHS=OUT),
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "[]", (args[0], done.stdout)
