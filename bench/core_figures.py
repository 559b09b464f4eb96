"""Producer cost and detection latency on this machine (the figures of the core issue).

Run by hand: `python bench/core_figures.py [--runs 50]`. Prints medians; never part of tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.install import normal_install  # noqa: E402
from bridge.config import load_config  # noqa: E402
from bridge.events import hydra_envelope  # noqa: E402
from bridge.hookscript import render_hook_script  # noqa: E402
from bridge.spool import SpoolLayout, event_file_name  # noqa: E402
from tests.integration.daemonproc import configured, running, wait_for  # noqa: E402
from tests.nixhelpers import build, hydra_payload, offline_env  # noqa: E402

STAMP_BACKEND = """#!/bin/sh
# An instant backend: note when the push started, read the paths, succeed.
date +%s.%N >> "$STAMPS"
cat > /dev/null
exit 0
"""


def timed(args: list[str], env: dict[str, str], runs: int) -> list[float]:
    """Wall times of `runs` sequential runs of args."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return times


def ms(values: list[float]) -> str:
    """Median and p90 in milliseconds."""
    ordered = sorted(values)
    return (
        f"median {statistics.median(ordered) * 1000:.1f} ms, "
        f"p90 {ordered[int(len(ordered) * 0.9) - 1] * 1000:.1f} ms"
    )


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    runs = parser.parse_args().runs
    work = Path(tempfile.mkdtemp(prefix="hcb-bench-"))
    stamps = work / "stamps"
    backend = work / "stamp-backend"
    backend.write_text(STAMP_BACKEND)
    backend.chmod(0o755)
    daemon = configured(
        work,
        f'[caches.instant]\nbackend = "cachix"\nexecutable = "{backend}"\n',
        env={"STAMPS": str(stamps)},
        metrics=False,
    )
    config_file = daemon.config
    config = load_config(config_file)
    layout = SpoolLayout(config.spool_dir)
    layout.ensure()
    env = offline_env({"STAMPS": str(stamps)})
    (item,) = build(work, 1, prefix="hcb-bench")

    payload = work / "payload.json"
    payload.write_text(json.dumps(hydra_payload(1, item)))
    # The producer as `pip install .` gives it, against the floor of the same interpreter.
    python = normal_install(work / "install")
    cli = [
        str(python.with_name("hydra-cachix-bridge")),
        "enqueue-hydra",
        "--config",
        str(config_file),
        "--json-file",
        str(payload),
    ]
    installed_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    bare = timed([str(python), "-c", "pass"], installed_env, runs)
    enqueue = timed(cli, installed_env, runs)

    hook = work / "hook.sh"
    hook.write_text(render_hook_script(layout))
    hook.chmod(0o755)
    hook_env = dict(env, DRV_PATH=item.drv, OUT_PATHS="")
    sh_true = timed(["/bin/sh", "-c", "true"], hook_env, runs)
    hook_times = timed([str(hook)], hook_env, runs)
    # The hook's events (in hook/, picked up like incoming/) must not reach the daemon.
    for leftover in [*layout.incoming.iterdir(), *layout.hook.iterdir()]:
        leftover.unlink()

    with running(daemon, notify_ready=True):
        latencies = []
        for build_id in range(runs):
            before = stamps.read_text().count("\n") if stamps.exists() else 0
            items = build(work, 1, prefix="hcb-lat")
            document = hydra_envelope(hydra_payload(build_id, items[0]), time.time())
            name = event_file_name("hydra")
            (layout.tmp / name).write_text(json.dumps(document))
            landed = time.time()
            os.rename(layout.tmp / name, layout.incoming / name)
            wait_for(
                lambda before=before: stamps.exists() and stamps.read_text().count("\n") > before,
                10,
                interval=0.001,
                message="the push to start",
            )
            started = float(stamps.read_text().splitlines()[before])
            latencies.append(started - landed)

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {when}"
    )
    print(f"venv python -c pass       : {ms(bare)}")
    print(f"enqueue-hydra (one event) : {ms(enqueue)}")
    ratio = statistics.median(enqueue) / statistics.median(bare)
    print(f"enqueue-hydra / floor     : {ratio:.2f}x (medians; target 1.5x)")
    print(f"sh -c true                : {ms(sh_true)}")
    print(f"hook-script hook          : {ms(hook_times)}")
    print(f"spool landing -> push start: {ms(latencies)}")


if __name__ == "__main__":
    main()
