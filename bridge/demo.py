"""The README's main job: real builds with the hook, a Hydra payload, pushes to a file:// cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bridge.config import Config, default_config, load_config
from bridge.daemon import Daemon, DaemonError
from bridge.hookscript import render_hook_script
from bridge.queue import Queue, QueueError
from bridge.spool import SpoolLayout


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


def _wait_pushed(config: Config, expected: int, timeout: float) -> dict[str, int]:
    queue = Queue(config.database_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            counts: dict[str, int] = {}
            for (_, state), count in queue.counts().items():
                counts[state] = counts.get(state, 0) + count
            done = counts.get("pushed", 0) + counts.get("dead", 0) + counts.get("skipped", 0)
            if done >= expected and not counts.get("pending") and not counts.get("inflight"):
                return counts
            if time.monotonic() > deadline:
                raise DemoError(f"not everything was pushed within {timeout:.0f}s: {counts}")
            time.sleep(0.1)
    finally:
        queue.close()


def run_demo(
    *, state_dir: Path | None, builds: int, timeout: float, echo: Callable[[str], None]
) -> str:
    """Run the demo end to end and return a summary; raise DemoError on any failure."""
    if shutil.which("nix-build") is None:
        raise DemoError("nix-build not found: install Nix (on Debian: apt-get install -y nix-bin)")
    started = time.monotonic()
    config_file: Path | None = None
    if state_dir is not None:
        state_dir = state_dir.absolute()
        state_dir.mkdir(parents=True, exist_ok=True)
        config_file = state_dir / "demo.toml"
        cache_uri = json.dumps(f"file://{state_dir / 'binary-cache'}")
        config_file.write_text(
            f"state_dir = {json.dumps(str(state_dir))}\n"
            f'[caches.local]\nbackend = "nix-copy"\nuri = {cache_uri}\n'
        )
        config = load_config(config_file)
    else:
        config = default_config()
    work = config.state_dir / "demo"
    work.mkdir(parents=True, exist_ok=True)
    hook = config.state_dir / "post-build-hook.sh"
    hook.write_text(render_hook_script(SpoolLayout.of(config)))
    hook.chmod(0o755)

    daemon = Daemon(config, serve_metrics=False)
    stop = threading.Event()
    try:
        daemon.start()
    except (DaemonError, QueueError) as exc:
        daemon.shutdown()
        raise DemoError(str(exc)) from None
    runner = threading.Thread(target=daemon.run_until, args=(stop,), daemon=True)
    runner.start()
    try:
        nonce = f"{int(time.time())}-{os.getpid()}"
        expr = work / f"demo-{nonce}.nix"
        expr.write_text(_nix_expression(nonce, builds))
        echo(f"building {builds + 1} derivations with the post-build-hook {hook} …")
        env = dict(os.environ, NIX_CONFIG=os.environ.get("NIX_CONFIG", "") + "\nsubstituters =")
        built = subprocess.run(
            ["nix-build", str(expr), "--no-out-link", "--option", "post-build-hook", str(hook)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if built.returncode != 0:
            raise DemoError(f"nix-build failed: {built.stderr.strip()[-2000:]}")
        out_paths = built.stdout.split()
        bundle = next(p for p in out_paths if p.endswith("-bundle"))
        drv = subprocess.run(
            ["nix-store", "--query", "--deriver", bundle],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        payload_file = work / f"hydra-{nonce}.json"
        payload_file.write_text(json.dumps(hydra_payload(1, drv, bundle, int(time.time()))))
        echo("replaying a Hydra RunCommand payload for the bundle with `enqueue-hydra` …")
        command = [
            sys.executable,
            "-m",
            "bridge",
            "enqueue-hydra",
            "--json-file",
            str(payload_file),
        ]
        if config_file is not None:
            command += ["--config", str(config_file)]
        enqueued = subprocess.run(command, capture_output=True, text=True, check=False)
        if enqueued.returncode != 0:
            raise DemoError(f"enqueue-hydra failed: {enqueued.stderr.strip()}")
        counts = _wait_pushed(config, len(out_paths), timeout)
    finally:
        stop.set()
        runner.join(timeout=60)
    cache = config.caches["local"]
    cache_dir = Path((cache.uri or "").removeprefix("file://"))
    missing = [
        p
        for p in out_paths
        if not (cache_dir / f"{Path(p).name.split('-', 1)[0]}.narinfo").is_file()
    ]
    if missing:
        raise DemoError(f"narinfo missing in {cache_dir} for: {', '.join(missing)}")

    def value(name: str, **labels: str) -> float:
        sample = daemon.registry.get_sample_value(f"hydra_cachix_bridge_{name}", labels)
        return sample or 0.0

    from_hook = value("events_received_total", source="hook")
    from_hydra = value("events_received_total", source="hydra")
    invocations = value("pushes_succeeded_total", cache="local", backend="nix-copy")
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
            f"  binary cache    {cache.uri} ({len(out_paths)} narinfo files checked)",
            f"  state           {config.state_dir}",
            f"  took            {time.monotonic() - started:.1f}s",
            "",
            "next: `hydra-cachix-bridge status`, or `hydra-cachix-bridge run` "
            "to keep the daemon going",
        ]
    )
