"""The README's main job: real builds with the hook, a Hydra payload, pushes to a file:// cache."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from bridge.config import Config, default_config, load_config
from bridge.daemon import Daemon, DaemonError
from bridge.hookscript import render_hook_script
from bridge.nixbuild import nix_build_command
from bridge.spool import SpoolLayout
from bridge.statedb import StateDb, StateDbError

# Nix prints this line on stderr as each derivation starts building.
_BUILDING = re.compile(r"^building '(/nix/store/[^']+\.drv)'")
# While waiting, a progress line at least this often, so no step looks stuck.
PROGRESS_SECONDS = 3.0


class DemoError(Exception):
    """The demo could not run or did not finish."""


def _nix_expression(nonce: str, builds: int) -> str:
    leaves = "\n".join(
        f'  leaf{i} = mk "hcb-demo-{nonce}-leaf{i}" "echo leaf {i} > $out";' for i in range(builds)
    )
    refs = " ".join(f"${{leaf{i}}}" for i in range(builds))
    return f"""let
  mk = name: script: derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  }};
in rec {{
{leaves}
  # Refers to every leaf, so pushing it pushes their closure too.
  bundle = mk "hcb-demo-{nonce}-bundle" "echo {refs} > $out";
}}
"""


def hydra_payload(build_id: int, drv_path: str, out_path: str, now: int) -> dict[str, object]:
    """A buildFinished payload with every field Hydra sends."""
    return {
        "event": "buildFinished",
        "build": build_id,
        "finished": True,
        "timestamp": now - 5,
        "startTime": now - 3,
        "stopTime": now,
        "project": "demo",
        "jobset": "main",
        "job": "bundle.x86_64-linux",
        "drvPath": drv_path,
        "buildStatus": 0,
        "nixName": Path(out_path).name.split("-", 1)[1],
        "system": "x86_64-linux",
        "homepage": None,
        "description": "hydra-cachix-bridge demo bundle",
        "license": None,
        "outputs": [{"name": "out", "path": out_path}],
        "products": [],
        "metrics": [],
    }


def _done_counts(db: StateDb) -> dict[str, dict[str, int]]:
    """Items per cache and state."""
    counts: dict[str, dict[str, int]] = {}
    for (cache, state), count in db.counts().items():
        counts.setdefault(cache, {})[state] = count
    return counts


def _finished(states: dict[str, int]) -> int:
    return sum(states.get(state, 0) for state in ("pushed", "dead", "skipped"))


def _wait_recorded(registry: CollectorRegistry, expected: dict[str, int], timeout: float) -> None:
    """Wait until the daemon has counted the expected events per source."""
    deadline = time.monotonic() + timeout

    def received(source: str) -> float:
        name = "hydra_cachix_bridge_events_received_total"
        return registry.get_sample_value(name, {"source": source}) or 0.0

    while any(received(source) < count for source, count in expected.items()):
        if time.monotonic() > deadline:
            got = ", ".join(f"{received(s):.0f} from {s}" for s in expected)
            raise DemoError(f"the daemon did not record the demo's events in time ({got})")
        time.sleep(0.1)


def _wait_pushed(
    config: Config,
    baseline: dict[str, dict[str, int]],
    expected: int,
    timeout: float,
    echo: Callable[[str], None],
) -> dict[str, int]:
    """Wait until this run's paths left the queue in every cache, printing progress."""
    db = StateDb(config.database_path)
    try:
        deadline = time.monotonic() + timeout
        shown: dict[str, int] = {}
        last_line = time.monotonic()
        while True:
            counts = _done_counts(db)
            busy = False
            for cache in config.caches:
                states = counts.get(cache, {})
                done = _finished(states) - _finished(baseline.get(cache, {}))
                if done < expected or states.get("pending") or states.get("inflight"):
                    busy = True
                quiet = time.monotonic() - last_line >= PROGRESS_SECONDS
                if done != shown.get(cache) or (quiet and done < expected):
                    shown[cache] = done
                    last_line = time.monotonic()
                    echo(f"pushing to {cache}: {min(done, expected)}/{expected} path(s) done")
            if not busy:
                total: dict[str, int] = {}
                for states in counts.values():
                    for state, count in states.items():
                        total[state] = total.get(state, 0) + count
                return total
            if time.monotonic() > deadline:
                raise DemoError(f"not everything was pushed within {timeout:.0f}s: {counts}")
            time.sleep(0.1)
    finally:
        db.close()


def _build(
    expr: Path, hook: Path, builds: int, timeout: float, echo: Callable[[str], None]
) -> list[str]:
    """nix-build the expression with the hook, printing each derivation as it starts."""
    env = dict(os.environ, NIX_CONFIG=os.environ.get("NIX_CONFIG", "") + "\nsubstituters =")
    command = nix_build_command(
        [str(expr), "--no-out-link", "--option", "post-build-hook", str(hook)], with_hook=True
    )
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    timer = threading.Timer(timeout, _kill_group, args=(proc,))
    timer.start()
    tail: list[str] = []
    started = 0
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            tail = [*tail[-40:], line.rstrip("\n")]
            match = _BUILDING.match(line)
            if match:
                started += 1
                name = match.group(1).split("-", 1)[1].removesuffix(".drv")
                echo(f"building {started}/{builds}: {name}")
        out = proc.stdout.read()
        code = proc.wait()
    finally:
        timer.cancel()
    if code != 0:
        raise DemoError(f"nix-build failed (exit {code}): " + "\n".join(tail)[-2000:])
    return out.split()


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _command_name() -> str:
    """How to run this program again, as the user started it (a venv's script, or -m)."""
    script = Path(sys.executable).parent / "hydra-cachix-bridge"
    if script.is_file() and os.access(script, os.X_OK):
        try:
            relative = script.relative_to(Path.cwd())
        except ValueError:
            return str(script)
        return str(relative) if str(relative).startswith(".") else f"./{relative}"
    found = shutil.which("hydra-cachix-bridge")
    if found is not None:
        return "hydra-cachix-bridge"
    return f"{sys.executable} -m bridge"


def _baseline(config: Config) -> dict[str, dict[str, int]]:
    db = StateDb(config.database_path)
    try:
        return _done_counts(db)
    finally:
        db.close()


def run_demo(
    *, state_dir: Path | None, builds: int, timeout: float, echo: Callable[[str], None]
) -> str:
    """Run the demo end to end and return a summary; raise DemoError on any failure."""
    if shutil.which("nix-build") is None:
        raise DemoError("nix-build not found: install Nix (on Debian: apt-get install -y nix-bin)")
    started = time.monotonic()
    config, config_file = _demo_config(state_dir)
    work = config.state_dir / "demo"
    work.mkdir(parents=True, exist_ok=True)
    hook = config.state_dir / "post-build-hook.sh"
    hook.write_text(render_hook_script(SpoolLayout.of(config)))
    hook.chmod(0o755)

    daemon = Daemon(config, serve_metrics=False)
    stop = threading.Event()
    try:
        daemon.start()
    except (DaemonError, StateDbError) as exc:
        daemon.shutdown()
        raise DemoError(str(exc)) from None
    runner = threading.Thread(target=daemon.run_until, args=(stop,), daemon=True)
    runner.start()
    try:
        nonce = f"{int(time.time())}-{os.getpid()}"
        expr = work / f"demo-{nonce}.nix"
        expr.write_text(_nix_expression(nonce, builds))
        echo(f"building {builds + 1} derivations with the post-build-hook {hook} …")
        baseline = _baseline(config)
        out_paths = _build(expr, hook, builds + 1, timeout, echo)
        echo(f"built {len(out_paths)} derivations; the hook recorded each in the spool")
        echo("replaying a Hydra RunCommand payload for the bundle with `enqueue-hydra` …")
        _replay_runcommand(work / f"hydra-{nonce}.json", out_paths, config_file, timeout)
        echo("recorded build 1 (demo:main:bundle.x86_64-linux); waiting for the pushes …")
        counts = _wait_pushed(config, baseline, len(out_paths), timeout, echo)
        # Its paths were pushed already (the hook queued them): wait for the event itself.
        _wait_recorded(daemon.registry, {"hook": len(out_paths), "hydra": 1}, timeout)
    finally:
        stop.set()
        runner.join(timeout=60)
    _check_cache(config, out_paths)
    return _summary(
        daemon.registry, config, config_file, hook, out_paths, counts, time.monotonic() - started
    )


def _demo_config(state_dir: Path | None) -> tuple[Config, Path | None]:
    """The embedded defaults, or a config file pointing into state_dir (and its path)."""
    if state_dir is None:
        return default_config(), None
    state_dir = state_dir.absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    config_file = state_dir / "demo.toml"
    cache_uri = json.dumps(f"file://{state_dir / 'binary-cache'}")
    config_file.write_text(
        f"state_dir = {json.dumps(str(state_dir))}\n"
        f'[caches.local]\nbackend = "nix-copy"\nuri = {cache_uri}\n'
    )
    return load_config(config_file), config_file


def _replay_runcommand(
    payload_file: Path, out_paths: list[str], config_file: Path | None, timeout: float
) -> None:
    """Hand the bundle's build to `enqueue-hydra` as Hydra's RunCommand would."""
    bundle = next(p for p in out_paths if p.endswith("-bundle"))
    drv = _run(["nix-store", "--query", "--deriver", bundle], "nix-store --query", timeout).strip()
    payload_file.write_text(json.dumps(hydra_payload(1, drv, bundle, int(time.time()))))
    command = [sys.executable, "-m", "bridge", "enqueue-hydra", "--json-file", str(payload_file)]
    if config_file is not None:
        command += ["--config", str(config_file)]
    _run(command, "enqueue-hydra", timeout)


def _run(command: list[str], what: str, timeout: float) -> str:
    """A short command's stdout (it starts no children); DemoError with its stderr when it
    fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DemoError(f"{what}: {exc}") from None
    if done.returncode != 0:
        raise DemoError(f"{what} failed: {done.stderr.strip()}")
    return done.stdout


def _check_cache(config: Config, out_paths: list[str]) -> None:
    """Every built path has its .narinfo in the file:// cache."""
    cache = config.caches["local"]
    cache_dir = Path((cache.uri or "").removeprefix("file://"))
    missing = [
        p
        for p in out_paths
        if not (cache_dir / f"{Path(p).name.split('-', 1)[0]}.narinfo").is_file()
    ]
    if missing:
        raise DemoError(f"narinfo missing in {cache_dir} for: {', '.join(missing)}")


def _summary(
    registry: CollectorRegistry,
    config: Config,
    config_file: Path | None,
    hook: Path,
    out_paths: list[str],
    counts: dict[str, int],
    took: float,
) -> str:
    """What the demo did, for people."""

    def value(name: str, **labels: str) -> float:
        sample = registry.get_sample_value(f"hydra_cachix_bridge_{name}", labels)
        return sample or 0.0

    from_hook = value("events_received_total", source="hook")
    from_hydra = value("events_received_total", source="hydra")
    invocations = value("pushes_succeeded_total", cache="local", backend="nix-copy")
    again = _command_name()
    config_arg = f" --config {config_file}" if config_file is not None else ""
    return "\n".join(
        [
            "",
            "demo finished: every built path is in the binary cache",
            f"  built           {len(out_paths)} derivations "
            f"(nix-build, post-build-hook {hook.name})",
            f"  events          {from_hook + from_hydra:.0f} recorded "
            f"({from_hook:.0f} from the hook, {from_hydra:.0f} from Hydra's RunCommand)",
            "  queue           "
            + ", ".join(
                f"{counts.get(state, 0)} {state}"
                for state in ("pushed", "pending", "skipped", "dead")
            )
            + " (all demo runs in this state directory)",
            f"  pushes          {invocations:.0f}"
            f" nix copy invocation(s), {value('paths_pushed_total', cache='local'):.0f} path(s)",
            f"  binary cache    {config.caches['local'].uri}"
            f" ({len(out_paths)} narinfo files checked)",
            f"  state           {config.state_dir}",
            f"  took            {took:.1f}s",
            "",
            f"next: `{again} status{config_arg}` shows the queue, "
            f"`{again} run{config_arg}` keeps the daemon going",
        ]
    )
