"""Benchmarks of hydra-cachix-bridge with real Nix and real SQLite, written to docs/benchmarks.md.

    python bench/run.py                      # every scenario, full sizes (about 15 minutes)
    python bench/run.py --scenario 3 5       # some of them
    python bench/run.py --smoke --output /tmp/b.md   # tiny sizes: checks the runner works

Run it on a quiet machine: the figures are wall-clock times. Never part of the test suite
(only the smoke mode is, so the runner does not rot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from bench.install import normal_install  # noqa: E402
from bridge.clock import SystemClock  # noqa: E402
from bridge.config import load_config  # noqa: E402
from bridge.daemon import Daemon as BridgeDaemonForMetrics  # noqa: E402
from bridge.events import hook_envelope, hydra_envelope  # noqa: E402
from bridge.hookscript import render_hook_script  # noqa: E402
from bridge.ingest import Ingestor  # noqa: E402
from bridge.intake import Intake  # noqa: E402
from bridge.nixbuild import nix_build_command  # noqa: E402
from bridge.spool import SpoolLayout, event_file_name  # noqa: E402
from bridge.statedb import StateDb  # noqa: E402
from bridge.store import NixStore  # noqa: E402
from tests.integration.daemonproc import (  # noqa: E402
    DaemonProcess,
    configured,
    fake_path,
    running,
    wait_for,
)
from tests.nixhelpers import nix_expression, offline_env  # noqa: E402

# The first spool scan comes before READY=1: with 10,000 files it takes seconds, more on a
# busy machine.
READY_TIMEOUT = 600.0

FAKES = ROOT / "tests" / "fakes"


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is."""

    builds: int = 40
    reps: int = 5
    sync_reps: int = 2
    # Runs of no hook, the empty sh hook and hook-script, paired run by run (the hook's cost
    # over the empty hook is well under the noise of one run on a busy machine).
    pair_reps: int = 15
    hook_calls: int = 200
    enqueue_runs: int = 100
    latency_rate: int = 50
    latency_seconds: float = 60.0
    ingest_files: int = 10_000
    drain_paths: int = 100_000
    scale_small: int = 1_000
    scale_large: int = 100_000
    scale_window: int = 1_000
    scrapes: int = 30
    hydra_catch_up: int = 100_000
    hydra_latency_rate: int = 50
    hydra_latency_seconds: float = 30.0


FULL = Sizes()
SMOKE = Sizes(
    builds=3,
    reps=1,
    sync_reps=1,
    pair_reps=1,
    hook_calls=10,
    enqueue_runs=5,
    latency_rate=20,
    latency_seconds=2.0,
    ingest_files=300,
    drain_paths=600,
    scale_small=200,
    scale_large=2_000,
    scale_window=200,
    scrapes=3,
    hydra_catch_up=2_000,
    hydra_latency_rate=20,
    hydra_latency_seconds=1.0,
)


@dataclass
class Row:
    """One measured figure against its target."""

    what: str
    value: str
    target: str = ""
    ok: bool | None = None


@dataclass
class Result:
    """A scenario's rows and notes."""

    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def ms(seconds: float) -> str:
    """Milliseconds with one decimal."""
    return f"{seconds * 1000:.1f} ms"


def timed_runs(commands: list[list[str]], runs: int, env: dict[str, str]) -> list[list[float]]:
    """Wall times of each command, interleaved run by run so load affects all alike."""
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(runs):
        for index, command in enumerate(commands):
            started = time.perf_counter()
            subprocess.run(
                command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            times[index].append(time.perf_counter() - started)
    return times


def instant_cache(name: str = "instant") -> str:
    """A cache whose push succeeds at once (/bin/true as the cachix executable)."""
    return f'[caches.{name}]\nbackend = "cachix"\nexecutable = "{shutil.which("true")}"\n'


def scrape_seconds(daemon: DaemonProcess) -> float:
    """Seconds for one GET /metrics."""
    started = time.perf_counter()
    daemon.metrics_text(timeout=30)
    return time.perf_counter() - started


def wait_pushed(daemon: DaemonProcess, count: int, timeout: float = 1800) -> float:
    """Seconds from now until `count` items are finished: pushed, or skipped.

    The prefilled paths are not in the store, so after cachix exits 0 the workers' check
    (as for any cachix push) ends them `skipped` (invalid_path): the figures include it.
    """
    started = time.monotonic()
    wait_for(
        lambda: daemon.items_in("pushed", "skipped") >= count,
        timeout,
        interval=0.02,
        message=f"{count} items pushed",
    )
    return time.monotonic() - started


# -- scenarios ----------------------------------------------------------------------------


SEED_HOOK = """#!/bin/bash
# The seed document's synchronous post-build-hook, as published, but for bash (it uses
# bash syntax) and for Nix 2.8's empty OUT_PATHS (resolved from DRV_PATH).
set -eu
set -f
OUT_PATHS=${OUT_PATHS:-$(nix-store --query --outputs "$DRV_PATH")}
OUT_END=$(echo ${OUT_PATHS: -10})
if [ "$OUT_END" == "-spec.json" ]; then
exit 0
fi
exec cachix push mycache $OUT_PATHS > /dev/null 2>&1
"""


def build_loop(sizes: Sizes, work: Path) -> Result:
    """Scenario 1: what each hook adds to a nix-build of independent derivations."""
    result = Result("1. Build-loop cost")
    spool = SpoolLayout(work / "spool")
    spool.ensure()
    config = work / "hook.toml"
    config.write_text(
        f'state_dir = "{work / "state"}"\nspool_dir = "{spool.root}"\n'
        '[caches.c]\nbackend = "nix-copy"\nuri = "file:///unused"\n'
    )
    ours = work / "hook-script.sh"
    ours.write_text(render_hook_script(spool))  # ensure() made its hook directory
    python_hook = work / "enqueue-hook.sh"
    python_hook.write_text(
        f"#!/bin/sh\nexec {sys.executable} -m bridge enqueue-hook --config {config}\n"
    )
    seed = work / "seed-hook.sh"
    seed.write_text(SEED_HOOK)
    bindir = work / "bin"
    bindir.mkdir()
    (bindir / "cachix").symlink_to(FAKES / "cachix")
    for script in (ours, python_hook, seed):
        script.chmod(0o755)
    env = offline_env(
        {
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "FAKE_CACHIX_ROOT": str(work / "cachix"),
            "FAKE_CACHIX_SLEEP": "1",
            "CACHIX_AUTH_TOKEN": "bench",
            "PYTHONPATH": str(ROOT),
        }
    )
    # The floor: what Nix itself spends running any post-build-hook, and a shell that does
    # nothing. No hook can cost less than these.
    true_hook = Path(shutil.which("true") or "/bin/true")
    empty_sh = work / "empty-hook.sh"
    empty_sh.write_text("#!/bin/sh\nexit 0\n")
    empty_sh.chmod(0o755)
    variants = {
        "no hook": None,
        "floor: `true` as the hook": true_hook,
        "floor: empty sh script": empty_sh,
        "hook-script (sh)": ours,
        "enqueue-hook (Python)": python_hook,
        "seed: synchronous cachix push (1 s)": seed,
    }
    paired = ("no hook", "floor: empty sh script", "hook-script (sh)")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(max(sizes.reps, sizes.pair_reps)):
        for name, hook in variants.items():
            if hook is seed and rep >= sizes.sync_reps:
                continue
            if rep >= sizes.reps and name not in paired:
                continue
            nonce = f"{list(variants).index(name)}-{rep}-{time.time_ns()}"
            expr = work / f"b-{rep}-{abs(hash(name))}.nix"
            expr.write_text(nix_expression([f"bl-{nonce}-{i}" for i in range(sizes.builds)]))
            args = [str(expr), "--no-out-link", "--option", "max-jobs", "1"]
            if hook is not None:
                args += ["--option", "post-build-hook", str(hook)]
            # Every variant alike (inside a chroot each is wrapped; see bridge/nixbuild.py).
            args = nix_build_command(args, with_hook=True)
            started = time.perf_counter()
            done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"nix-build with {name} failed: {done.stderr[-2000:]}")
            times[name].append(time.perf_counter() - started)
        for leftover in [*spool.incoming.iterdir(), *spool.hook.iterdir()]:
            leftover.unlink()
    base = statistics.median(times["no hook"])
    result.rows.append(
        Row(f"nix-build of {sizes.builds} derivations, no hook (median)", f"{base:.2f} s")
    )
    for name in list(variants)[1:]:
        run = statistics.median(times[name])
        per_build = (run - base) / sizes.builds
        ratio = run / base
        if name.startswith("hook-script"):
            result.rows.append(
                Row(f"{name}: added per build", ms(per_build), "≤ 3 ms", per_build <= 0.003)
            )
            # Paired: each run of the hook against the empty hook's run just before it.
            empty = times["floor: empty sh script"]
            diffs = [a - b for a, b in zip(times[name], empty, strict=True)]
            over_empty = statistics.median(diffs) / sizes.builds
            result.rows.append(
                Row(
                    f"{name}: added per build over the empty sh hook "
                    f"(median of {len(diffs)} paired runs)",
                    ms(over_empty),
                    "≤ 1 ms",
                    over_empty <= 0.001,
                )
            )
            result.rows.append(
                Row(f"{name}: whole run vs no hook", f"{ratio:.3f}x", "≤ 1.10x", ratio <= 1.10)
            )
        else:
            result.rows.append(Row(f"{name}: added per build", ms(per_build)))
            result.rows.append(Row(f"{name}: whole run vs no hook", f"{ratio:.2f}x"))
    hook_env = dict(
        env,
        DRV_PATH="/nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv",
        OUT_PATHS="/nix/store/2jmiqxxd2z4ypk8am71rc6kffqzgma57-t",
    )
    sh_true, empty_alone, alone = timed_runs(
        [["/bin/sh", "-c", "true"], [str(empty_sh)], [str(ours)]], sizes.hook_calls, hook_env
    )
    for leftover in [*spool.incoming.iterdir(), *spool.hook.iterdir()]:
        leftover.unlink()
    result.rows.append(
        Row(
            f"`sh -c true` alone, {sizes.hook_calls} calls",
            f"median {ms(statistics.median(sh_true))}, p99 {ms(pct(sh_true, 0.99))}",
        )
    )
    result.rows.append(
        Row(
            f"empty sh hook alone, {sizes.hook_calls} calls",
            f"median {ms(statistics.median(empty_alone))}, p99 {ms(pct(empty_alone, 0.99))}",
        )
    )
    result.rows.append(
        Row(
            f"hook-script alone, {sizes.hook_calls} calls",
            f"median {ms(statistics.median(alone))}, p99 {ms(pct(alone, 0.99))}",
        )
    )
    result.notes.append(
        f"Each variant builds {sizes.builds} new trivial derivations with `max-jobs = 1`, "
        f"{sizes.reps} runs each ({sizes.sync_reps} for the synchronous hook; "
        f"{sizes.pair_reps} for no hook, the empty sh hook and hook-script), interleaved. "
        "The two floor rows show what Nix spends on running any hook at all; the targets "
        "are measured against no hook, and against the empty sh hook in the same run "
        "(what the hook's own work costs: one `printf` redirected into its root-only "
        "directory, no fork). "
        "The synchronous hook is the seed document's, calling the stand-in `cachix` "
        "told to take 1 s per push (it then really copies with `nix copy`)."
    )
    return result


def notify_cost(sizes: Sizes, work: Path) -> Result:
    """Scenario 2: what `enqueue-hydra` costs hydra-notify per build."""
    result = Result("2. hydra-notify cost")
    config = work / "notify.toml"
    config.write_text(
        f'state_dir = "{work / "state"}"\n'
        '[caches.c]\nbackend = "nix-copy"\nuri = "file:///unused"\n'
    )
    layout = SpoolLayout(load_config(config).spool_dir)
    layout.ensure()
    payload = work / "payload.json"
    drv = "/nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv"
    payload.write_text(
        json.dumps(
            {
                "event": "buildFinished",
                "build": 1,
                "finished": True,
                "timestamp": 1,
                "startTime": 1,
                "stopTime": 2,
                "project": "p",
                "jobset": "j",
                "job": "x",
                "drvPath": drv,
                "buildStatus": 0,
                "nixName": "t",
                "system": "x86_64-linux",
                "homepage": None,
                "description": None,
                "license": None,
                "products": [],
                "metrics": [],
                "outputs": [
                    {"name": "out", "path": "/nix/store/2jmiqxxd2z4ypk8am71rc6kffqzgma57-t"}
                ],
            }
        )
    )
    # What a user gets from `pip install .`: a throwaway venv, not the editable test install.
    python = normal_install(work / "install")
    script = python.with_name("hydra-cachix-bridge")
    real = Path(os.path.realpath(python))
    env = offline_env({"HYDRA_JSON": str(payload)})
    env.pop("PYTHONPATH", None)
    bare, real_bare, enqueue = timed_runs(
        [
            [str(python), "-c", "pass"],
            [str(real), "-c", "pass"],
            [str(script), "enqueue-hydra", "--config", str(config)],
        ],
        sizes.enqueue_runs,
        env,
    )
    if len(os.listdir(layout.incoming)) != sizes.enqueue_runs:
        raise SystemExit("enqueue-hydra did not record one event per run")
    ratio = statistics.median(enqueue) / statistics.median(bare)
    real_ratio = statistics.median(enqueue) / statistics.median(real_bare)
    result.rows += [
        Row(
            f"floor: the venv's `python -c pass`, {sizes.enqueue_runs} runs",
            f"median {ms(statistics.median(bare))}, p99 {ms(pct(bare, 0.99))}",
        ),
        Row(
            f"`{real} -c pass` (the binary it links to), {sizes.enqueue_runs} runs",
            f"median {ms(statistics.median(real_bare))}, p99 {ms(pct(real_bare, 0.99))}",
        ),
        Row(
            f"`hydra-cachix-bridge enqueue-hydra`, {sizes.enqueue_runs} runs",
            f"median {ms(statistics.median(enqueue))}, p99 {ms(pct(enqueue, 0.99))}",
        ),
        Row(
            "enqueue-hydra / the venv's python -c pass (medians)",
            f"{ratio:.2f}x",
            "≤ 1.5x",
            ratio <= 1.5,
        ),
        Row("enqueue-hydra / the linked binary's python -c pass (medians)", f"{real_ratio:.2f}x"),
    ]
    result.notes.append(
        "Installed with `pip install .` (not editable) into a throwaway venv made by the base "
        "interpreter; the command is the installed `hydra-cachix-bridge` script run by that "
        "venv's `python`, the floor is the same `python` starting with `-c pass`. The linked "
        "binary outside the venv loads the base installation's site-packages (and its `.pth` "
        "files), so it is shown but is not the floor. Each run reads the config, validates "
        "the payload and writes one event file (fsync, rename). The three commands are "
        "interleaved run by run."
    )
    return result


STAMP_BACKEND = """#!/bin/sh
# Instant backend: the time the push started, then the paths it got.
t=$(date +%s.%N)
while read -r p; do echo "$t $p"; done >> "$STAMPS"
exit 0
"""


def detection_latency(sizes: Sizes, work: Path) -> Result:
    """Scenario 3: event file renamed into the spool → push process started."""
    result = Result("3. Detection latency")
    stamps = work / "stamps"
    backend = work / "stamp-backend"
    backend.write_text(STAMP_BACKEND)
    backend.chmod(0o755)
    body = f'[caches.instant]\nbackend = "cachix"\nexecutable = "{backend}"\n'
    daemon = configured(work, body, env={"STAMPS": str(stamps)})
    landed: dict[str, float] = {}
    total = int(sizes.latency_rate * sizes.latency_seconds)
    with running(daemon, READY_TIMEOUT, notify_ready=True):
        layout = daemon.spool
        interval = 1.0 / sizes.latency_rate
        started = time.monotonic()
        for index in range(total):
            due = started + index * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            path = fake_path(index, "latency")
            name = event_file_name("hook")
            (layout.tmp / name).write_text(json.dumps(hook_envelope("", path, time.time())))
            landed[path] = time.time()
            os.rename(layout.tmp / name, layout.incoming / name)
        wait_for(
            lambda: stamps.exists() and stamps.read_text().count("\n") >= total,
            120,
            message="every event at the backend",
        )
    latencies = []
    for line in stamps.read_text().splitlines():
        when, path = line.split(" ", 1)
        latencies.append(float(when) - landed[path])
    p50, p99 = statistics.median(latencies), pct(latencies, 0.99)
    result.rows += [
        Row(f"{total} events at {sizes.latency_rate}/s: p50", ms(p50), "≤ 50 ms", p50 <= 0.050),
        Row("p99", ms(p99), "≤ 250 ms", p99 <= 0.250),
        Row("max", ms(max(latencies))),
    ]
    result.notes.append(
        "From the rename into `incoming/` to the first line of the backend "
        "process (which notes the time with `date`)."
    )
    return result


def ingest_throughput(sizes: Sizes, work: Path) -> Result:
    """Scenario 4: event files already in the spool at start, into the queue."""
    result = Result("4. Ingest throughput")
    rates, startups = [], []
    for rep in range(max(1, sizes.reps // 2)):
        directory = work / f"ingest-{rep}"
        directory.mkdir()
        daemon = configured(directory, instant_cache())
        config = load_config(daemon.config)
        layout = SpoolLayout(config.spool_dir)
        layout.ensure()
        _write_events(layout, sizes.ingest_files)
        # In-process: exactly the daemon's ingest pass, timed without interpreter start-up.
        metrics = BridgeDaemonForMetrics(
            config, registry=CollectorRegistry(), serve_metrics=False
        ).metrics
        queue = StateDb(config.database_path)
        intake = Intake(config.rules, metrics, SystemClock())
        ingestor = Ingestor(config, queue, NixStore(), intake, SystemClock())
        started = time.perf_counter()
        stats = ingestor.ingest(ingestor.scan())
        elapsed = time.perf_counter() - started
        queue.close()
        assert stats.recorded == sizes.ingest_files, stats
        rates.append(sizes.ingest_files / elapsed)
        # The same through a daemon process: start until READY (after the first scan).
        second = work / f"ingest-daemon-{rep}"
        second.mkdir()
        process = configured(second, instant_cache() + "[push]\nworkers = 1\n")
        second_layout = process.spool
        second_layout.ensure()
        _write_events(second_layout, sizes.ingest_files)
        with running(process, READY_TIMEOUT, notify_ready=True):
            startups.append(process.ready_after)
    rate = statistics.median(rates)
    result.rows += [
        Row(
            f"{sizes.ingest_files} files, ingest pass (median of {len(rates)})",
            f"{rate:,.0f} events/s",
            "≥ 2,000/s",
            rate >= 2000,
        ),
        Row(
            f"{sizes.ingest_files} files, daemon start to READY (median)",
            f"{statistics.median(startups):.2f} s "
            f"({sizes.ingest_files / statistics.median(startups):,.0f} events/s)",
        ),
    ]
    result.notes.append(
        "Half Hydra payloads (each naming a real, instantiated derivation, whose outputs "
        "the daemon checks against its .drv file), half hook events, each with two output "
        "paths; "
        "500 files per transaction, each file removed after its commit."
    )
    return result


_DERIVATIONS: dict[int, list[tuple[str, str, str]]] = {}


def real_derivations(count: int, work: Path) -> list[tuple[str, str, str]]:
    """(drv, out, dev) of count new two-output derivations, instantiated (never built).

    Hydra events name their drvPath, whose outputs the daemon checks in the store: the
    events must name real derivations, as Hydra's do.
    """
    if count in _DERIVATIONS:
        return _DERIVATIONS[count]
    nonce = os.urandom(4).hex()
    lines = ["{"]
    for index in range(count):
        lines.append(
            f'  d{index} = derivation {{ name = "hcb-bench-{nonce}-{index}"; '
            'system = builtins.currentSystem; builder = "/bin/sh"; outputs = [ "out" "dev" ]; '
            'args = [ "-c" ":" ]; };'
        )
    lines.append("}")
    expr = work / f"bench-derivations-{nonce}.nix"
    expr.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        ["nix-instantiate", str(expr)],
        capture_output=True,
        text=True,
        env=offline_env(),
        check=True,
        timeout=1800,
    )
    found = []
    for drv in done.stdout.split():
        text = Path(drv).read_text()
        outputs = dict(re.findall(r'\("(out|dev)","(/nix/store/[^"]+)"', text.split("],", 1)[0]))
        found.append((drv, outputs["out"], outputs["dev"]))
    _DERIVATIONS[count] = found
    return found


def _write_events(layout: SpoolLayout, count: int) -> None:
    now = time.time()
    derivations = real_derivations((count + 1) // 2, layout.root.parent)
    for index in range(count):
        paths = [fake_path(2 * index, "ingest"), fake_path(2 * index + 1, "ingest")]
        if index % 2:
            document = hook_envelope("", " ".join(paths), now)
        else:
            drv, out, dev = derivations[index // 2]
            document = hydra_envelope(
                {
                    "event": "buildFinished",
                    "build": index,
                    "finished": True,
                    "project": "p",
                    "jobset": "j",
                    "job": f"job{index}",
                    "buildStatus": 0,
                    "drvPath": drv,
                    "stopTime": int(now),
                    "outputs": [
                        {"name": "out", "path": out},
                        {"name": "dev", "path": dev},
                    ],
                },
                now,
            )
        name = event_file_name("bench")
        (layout.incoming / name).write_text(json.dumps(document))


def drain_throughput(sizes: Sizes, work: Path) -> tuple[Result, float]:
    """Scenario 5: pending paths pushed per second with an instant backend."""
    result = Result("5. Drain throughput")
    daemon = configured(work, instant_cache())
    daemon.prefill(sizes.drain_paths, cache="instant")
    with running(daemon, READY_TIMEOUT, notify_ready=True):
        elapsed = wait_pushed(daemon, sizes.drain_paths)
        peak = daemon.peak_rss_mib()
    rate = sizes.drain_paths / elapsed
    result.rows.append(
        Row(
            f"{sizes.drain_paths:,} pending paths, batch 32, 4 workers",
            f"{rate:,.0f} paths/s ({elapsed:.1f} s)",
            "≥ 5,000/s",
            rate >= 5000,
        )
    )
    result.notes.append(
        "Backend: `/bin/true` as the cachix executable (an instant push); "
        "each batch is still a real subprocess in its own process group. After a cachix "
        "push exits 0 the workers skip the paths it reported skipping and those gone from "
        "disk; the prefilled paths are not in the store, so they end skipped, which counts "
        "as drained."
    )
    return result, peak


def scale(sizes: Sizes, work: Path) -> tuple[Result, float]:
    """Scenario 6: dispatch cost and scrape time at a small and a large queue."""
    result = Result("6. Scale")
    costs: dict[int, list[float]] = {}
    scrapes: dict[int, list[float]] = {}
    holding_peak = 0.0
    for size in (sizes.scale_small, sizes.scale_large):
        costs[size] = []
        for rep in range(max(1, sizes.reps // 2)):
            directory = work / f"dispatch-{size}-{rep}"
            directory.mkdir()
            daemon = configured(directory, instant_cache())
            daemon.prefill(size, cache="instant")
            with running(daemon, READY_TIMEOUT, notify_ready=True):
                window = min(size, sizes.scale_window)
                costs[size].append(wait_pushed(daemon, window) / window)
        directory = work / f"scrape-{size}"
        directory.mkdir()
        daemon = configured(directory, instant_cache())
        # Pending, not due: the queue holds still.
        daemon.prefill(size, cache="instant", due_in=86400)
        with running(daemon, READY_TIMEOUT, notify_ready=True):
            scrapes[size] = [scrape_seconds(daemon) for _ in range(sizes.scrapes)]
            if size == sizes.scale_large:
                holding_peak = daemon.peak_rss_mib()
    small, large = sizes.scale_small, sizes.scale_large
    ratio = statistics.median(costs[large]) / statistics.median(costs[small])
    scrape_large = statistics.median(scrapes[large])
    result.rows += [
        Row(f"dispatch cost per path, {small:,} pending", ms(statistics.median(costs[small]))),
        Row(f"dispatch cost per path, {large:,} pending", ms(statistics.median(costs[large]))),
        Row(f"ratio {large:,} / {small:,}", f"{ratio:.2f}x", "≤ 1.5x", ratio <= 1.5),
        Row(f"/metrics scrape, {small:,} pending (median)", ms(statistics.median(scrapes[small]))),
        Row(
            f"/metrics scrape, {large:,} pending (median, p99 {ms(pct(scrapes[large], 0.99))})",
            ms(scrape_large),
            "≤ 50 ms",
            scrape_large <= 0.050,
        ),
    ]
    result.notes.append(
        f"Dispatch cost: time for the first {sizes.scale_window:,} paths "
        "after READY, per path. Scrapes: over HTTP, with the items pending "
        "but not yet due so the queue holds still."
    )
    return result, holding_peak


def memory(holding_peak: float, draining_peak: float, sizes: Sizes) -> Result:
    """Scenario 7: peak RSS with a large queue."""
    result = Result("7. Memory")
    result.rows += [
        Row(
            f"peak RSS holding {sizes.scale_large:,} pending paths (after {sizes.scrapes} scrapes)",
            f"{holding_peak:.1f} MiB",
            "≤ 100 MB",
            holding_peak <= 100,
        ),
        Row(
            f"peak RSS after draining {sizes.drain_paths:,} paths",
            f"{draining_peak:.1f} MiB",
            "≤ 100 MB",
            draining_peak <= 100,
        ),
    ]
    result.notes.append("VmHWM of the daemon process from /proc.")
    return result


# -- report -------------------------------------------------------------------------------


def machine() -> list[str]:
    """Lines that describe this machine and build."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "bridge", "exporter"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    nix = subprocess.run(
        ["nix", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return [
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- commit: {commit or 'unknown'}{' (with uncommitted changes)' if dirty else ''}",
        f"- machine: {cpu}, {os.cpu_count()} cores, {memory_kb / 1024 / 1024:.0f} GiB, "
        f"Linux {platform.release()}",
        f"- software: Python {platform.python_version()}, {nix}, SQLite {sqlite3.sqlite_version}",
    ]


def hydra_db_catch_up(sizes: Sizes, work: Path) -> Result:
    """Scenario 8: catch-up of finished builds from Hydra's PostgreSQL into the queue."""
    from bench.hydra_db import catch_up_rate

    result = Result("8. Hydra database catch-up")
    seconds, rate, recorded = catch_up_rate(work, sizes.hydra_catch_up, instant_cache())
    if recorded != sizes.hydra_catch_up:
        raise RuntimeError(f"catch-up recorded {recorded} of {sizes.hydra_catch_up} builds")
    result.rows += [
        Row(f"{sizes.hydra_catch_up} finished builds into the queue", f"{seconds:.1f} s"),
        Row("rate", f"{rate:,.0f} builds/s", "≥ 5,000 builds/s", rate >= 5000),
    ]
    result.notes.append(
        "PostgreSQL 15 on a Unix socket with Hydra's tables (one output per build); "
        "`HydraDbSource.catch_up` from a checkpoint before the first build: pages of "
        "5,000 rows by (stoptime, id), dedup against the builds seen, matching, one SQLite "
        "transaction per page with the checkpoint."
    )
    return result


def hydra_db_latency(sizes: Sizes, work: Path) -> Result:
    """Scenario 9: Hydra's NOTIFY build_finished → push process started."""
    from bench.hydra_db import notification_latency

    result = Result("9. Hydra database notification latency")
    latencies = notification_latency(
        work, sizes.hydra_latency_rate, sizes.hydra_latency_seconds, STAMP_BACKEND
    )
    p50, p99 = statistics.median(latencies), pct(latencies, 0.99)
    rate = sizes.hydra_latency_rate
    result.rows += [
        Row(f"{len(latencies)} builds at {rate}/s: p50", ms(p50), "≤ 50 ms", p50 <= 0.050),
        Row("p99", ms(p99), "≤ 250 ms", p99 <= 0.250),
        Row("max", ms(max(latencies))),
    ]
    result.notes.append(
        "From just before Hydra's `pg_notify('build_finished', id)` (its row already "
        "committed, as the queue runner does) to the first line of the backend process, "
        "through the daemon's LISTEN connection, the row read, matching and the queue."
    )
    return result


def render(results: list[Result], smoke: bool) -> str:
    """The markdown report."""
    lines = ["# Benchmarks", ""]
    if smoke:
        lines += ["**Smoke run with tiny sizes: these figures say nothing about speed.**", ""]
    lines += [
        "Measured by `python bench/run.py` on this machine; targets from the benchmark issue.",
        "Ratios hold on any machine; absolute numbers are for this one.",
        "",
        *machine(),
        "",
    ]
    for result in results:
        lines += [
            f"## {result.title}",
            "",
            "| measurement | value | target | met |",
            "|---|---|---|---|",
        ]
        for row in result.rows:
            met = "" if row.ok is None else ("yes" if row.ok else "**no**")
            lines.append(f"| {row.what} | {row.value} | {row.target} | {met} |")
        lines.append("")
        lines += [f"{note}" for note in result.notes]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and write the report; exit 1 if a target was missed."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for testing")
    parser.add_argument("--scenario", type=int, nargs="*", default=list(range(1, 10)))
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--append-notes",
        type=Path,
        default=ROOT / "bench" / "history.md",
        help="markdown appended to the report (profiling notes, history)",
    )
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    chosen = set(args.scenario)
    results: list[Result] = []
    draining_peak = holding_peak = float("nan")
    with tempfile.TemporaryDirectory(prefix="hcb-bench-") as tmp:
        work = Path(tmp)
        steps: list[tuple[int, Callable[[Path], None]]] = []

        def add(number: int, step: Callable[[Path], None]) -> None:
            steps.append((number, step))

        add(1, lambda d: results.append(build_loop(sizes, d)))
        add(2, lambda d: results.append(notify_cost(sizes, d)))
        add(3, lambda d: results.append(detection_latency(sizes, d)))
        add(4, lambda d: results.append(ingest_throughput(sizes, d)))

        def drain(d: Path) -> None:
            nonlocal draining_peak
            result, draining_peak = drain_throughput(sizes, d)
            results.append(result)

        def scaled(d: Path) -> None:
            nonlocal holding_peak
            result, holding_peak = scale(sizes, d)
            results.append(result)

        add(5, drain)
        add(6, scaled)
        add(8, lambda d: results.append(hydra_db_catch_up(sizes, d)))
        add(9, lambda d: results.append(hydra_db_latency(sizes, d)))
        for number, step in steps:
            if number in chosen or (number in (5, 6) and 7 in chosen):
                directory = work / f"scenario-{number}"
                directory.mkdir()
                print(f"scenario {number} …", file=sys.stderr, flush=True)
                step(directory)
        if 7 in chosen:
            results.append(memory(holding_peak, draining_peak, sizes))
    results = [r for r in results if int(r.title.split(".")[0]) in chosen]
    report = render(results, args.smoke)
    if args.append_notes is not None and args.append_notes.exists():
        report += "\n" + args.append_notes.read_text()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)
    missed = [row for result in results for row in result.rows if row.ok is False]
    return 1 if missed and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
