"""Load: 100 concurrent producers write events for 60 s while the daemon ingests and pushes.

95 threads write events in-process with bridge.spool.write_event (Hydra and hook
envelopes); 2 threads run the real `python -m bridge enqueue-hydra --json-file` command and
3 run the real sh post-build-hook rendered by `hook-script`. The daemon pushes to the
stand-in Cachix and to a nix-copy file:// cache (no rules: every event goes to both), over
100 real store paths that are revealed to the producers gradually, so there is new work to
push all along. Afterwards no event is lost or recorded twice, there is no error in the
daemon's log, nothing is quarantined, every distinct (cache, path) is pushed, and the
daemon's resident memory stayed flat.

Randomness is only in the producers' pace and choices; its seed is printed and can be fixed
with RELIABILITY_SEED.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.events import hook_envelope, hydra_envelope
from bridge.spool import SpoolLayout, write_event
from tests.integration.daemonproc import DaemonProcess, bridge, wait_for
from tests.nixhelpers import Built, build, hydra_payload
from tests.reliability.reporting import query, write_report

DERIVATIONS = 100
PRODUCERS = 100
ENQUEUE_HYDRA_PRODUCERS = 2
HOOK_SCRIPT_PRODUCERS = 3
IN_PROCESS_PRODUCERS = PRODUCERS - ENQUEUE_HYDRA_PRODUCERS - HOOK_SCRIPT_PRODUCERS
LOAD_SECONDS = 60.0
IN_PROCESS_GAP = (0.1, 0.6)  # seconds between two events of one in-process producer
WARM_UP_SECONDS = 5.0
WINDOW_SECONDS = 20.0
RSS_RATIO = 1.25
DRAIN_TIMEOUT = 60.0
CACHES = ("team", "mirror")


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Load:
    """The producers, their bookkeeping, and the RSS sampler."""

    def __init__(
        self,
        daemon: DaemonProcess,
        layout: SpoolLayout,
        built: list[Built],
        hook: Path,
        workdir: Path,
        seed: int,
    ) -> None:
        self.daemon = daemon
        self.layout = layout
        self.built = built
        self.hook = hook
        self.workdir = workdir
        self.seed = seed
        self.names: set[str] = set()
        self.paths: set[str] = set()
        self.by_producer: dict[str, int] = {"in-process": 0, "enqueue-hydra": 0, "hook-script": 0}
        self.errors: list[str] = []
        self.rss: list[tuple[float, int]] = []
        self.scrapes: list[tuple[float, int, float]] = []  # (time, written, received)
        self._lock = threading.Lock()
        self._build_ids = iter(range(1, 10_000_000))
        self.started = 0.0
        self.end = 0.0

    # -- bookkeeping ----------------------------------------------------------------------

    def _record(self, kind: str, name: str, paths: list[str]) -> None:
        with self._lock:
            if name in self.names:
                self.errors.append(f"two producers wrote the same spool name {name}")
            self.names.add(name)
            self.paths.update(paths)
            self.by_producer[kind] += 1

    def _pick(self, rng: random.Random) -> Built:
        """A revealed path: the set grows linearly over the load, so pushes never stop."""
        elapsed = time.monotonic() - self.started
        revealed = max(5, min(len(self.built), int(len(self.built) * elapsed / LOAD_SECONDS) + 1))
        if rng.random() < 0.5:
            return self.built[rng.randrange(max(0, revealed - 5), revealed)]
        return self.built[rng.randrange(revealed)]

    def _next_build_id(self) -> int:
        with self._lock:
            return next(self._build_ids)

    # -- producers ------------------------------------------------------------------------

    def in_process(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + k)
        time.sleep(rng.uniform(0, IN_PROCESS_GAP[1]))
        while time.monotonic() < self.end:
            item = self._pick(rng)
            try:
                if rng.random() < 0.5:
                    payload = hydra_payload(self._next_build_id(), item)
                    target = write_event(self.layout, "hydra", hydra_envelope(payload, time.time()))
                else:
                    outs = item.out if rng.random() < 0.6 else ""
                    target = write_event(
                        self.layout, "hook", hook_envelope(item.drv, outs, time.time())
                    )
            except Exception as exc:
                with self._lock:
                    self.errors.append(f"write_event: {exc!r}")
                continue
            self._record("in-process", target.name, [item.out])
            time.sleep(rng.uniform(*IN_PROCESS_GAP))

    def enqueue_hydra(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + 500 + k)
        while time.monotonic() < self.end:
            item = self._pick(rng)
            build_id = self._next_build_id()
            payload_file = self.workdir / f"payload-{build_id}.json"
            payload_file.write_text(json.dumps(hydra_payload(build_id, item)))
            done = bridge(
                "enqueue-hydra",
                "--config",
                str(self.daemon.config),
                "--json-file",
                str(payload_file),
                env=self.daemon.env,
            )
            found = re.search(r" as (\S+\.json)$", done.stdout.strip())
            if done.returncode != 0 or found is None:
                with self._lock:
                    self.errors.append(f"enqueue-hydra: {done.returncode} {done.stderr.strip()}")
                continue
            self._record("enqueue-hydra", found.group(1), [item.out])
            time.sleep(rng.uniform(0.2, 0.8))

    def run_hook(self, item: Built, outs: str) -> str | None:
        """Run the real sh post-build-hook once; return the spool name it wrote."""
        proc = subprocess.Popen(
            [str(self.hook)],
            env=dict(self.daemon.env, DRV_PATH=item.drv, OUT_PATHS=outs),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = proc.communicate(timeout=30)
        if proc.returncode != 0 or err.strip():
            with self._lock:
                self.errors.append(f"hook script: {proc.returncode} {err.strip()}")
            return None
        # The hook names its file after its own PID and the derivation's hash.
        name = f"hook-{proc.pid}-{Path(item.drv).name.split('-', 1)[0]}.json"
        self._record("hook-script", name, [item.out])
        return name

    def hook_script(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + 700 + k)
        while time.monotonic() < self.end:
            item = self._pick(rng)
            # Nix 2.8 passes an empty OUT_PATHS: the daemon reads the outputs from the .drv.
            self.run_hook(item, item.out if rng.random() < 0.3 else "")
            time.sleep(rng.uniform(0.1, 0.3))

    def sample(self, pid: int) -> None:
        """VmRSS every second; a Prometheus-like scrape every 5 s."""
        next_scrape = 0.0
        while time.monotonic() < self.end + 1:
            now = time.monotonic() - self.started
            rss = rss_kib(pid)
            if rss is None:
                return
            self.rss.append((now, rss))
            if now >= next_scrape:
                with self._lock:
                    sent = len(self.names)
                received = self.daemon.metric("hydra_cachix_bridge_events_received_total")
                self.scrapes.append((now, sent, received))
                next_scrape = now + 5
            time.sleep(max(0.0, 1.0 - (time.monotonic() - self.started - now)))

    def run(self) -> float:
        """Run every producer for LOAD_SECONDS; return the wall time they took."""
        assert self.daemon.proc is not None
        self.started = time.monotonic()
        self.end = self.started + LOAD_SECONDS
        threads = [
            threading.Thread(target=self.in_process, args=(k,), daemon=True)
            for k in range(IN_PROCESS_PRODUCERS)
        ]
        threads += [
            threading.Thread(target=self.enqueue_hydra, args=(k,), daemon=True)
            for k in range(ENQUEUE_HYDRA_PRODUCERS)
        ]
        threads += [
            threading.Thread(target=self.hook_script, args=(k,), daemon=True)
            for k in range(HOOK_SCRIPT_PRODUCERS)
        ]
        assert len(threads) == PRODUCERS
        sampler = threading.Thread(target=self.sample, args=(self.daemon.proc.pid,), daemon=True)
        sampler.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=LOAD_SECONDS + 60)
        elapsed = time.monotonic() - self.started
        sampler.join(timeout=10)
        return elapsed


@pytest.mark.timing
def test_hundred_producers_for_a_minute(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
    nix_available: None,
) -> None:
    seed = int(os.environ.get("RELIABILITY_SEED") or time.time_ns() % 1_000_000_007)
    print(f"\nload: seed {seed} (set RELIABILITY_SEED={seed} to repeat)")
    built = build(workdir, DERIVATIONS, prefix="load")
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    mirror = tmp_path / "mirror"
    daemon = daemon_factory(
        "[push]\nworkers = 4\nbatch_size = 16\ntimeout_seconds = 120\n"
        "backoff_initial_seconds = 0.2\nbackoff_max_seconds = 1\n"
        f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{token}"\n'
        f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{mirror}"\n',
        env={"FAKE_CACHIX_SLEEP": "0.05"},
    )
    state = tmp_path / "state"
    db = state / "queue.sqlite3"
    layout = SpoolLayout(state / "spool")
    rendered = bridge("hook-script", "--config", str(daemon.config), env=daemon.env)
    assert rendered.returncode == 0, rendered.stderr
    hook = tmp_path / "post-build-hook"
    hook.write_text(rendered.stdout)
    hook.chmod(0o755)
    load = Load(daemon, layout, built, hook, workdir, seed)
    # Steady state: the hook has run once before, so its hook-tmp/ exists. (Its first runs
    # racing each other are test_first_hook_runs_at_once_are_all_recorded below.)
    assert load.run_hook(built[0], built[0].out) is not None, load.errors
    elapsed = load.run()
    assert load.errors == [], load.errors[:10]
    written = len(load.names)
    rate = written / elapsed

    # Let the daemon catch up: every file recorded, nothing left to push.
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        left = sum(1 for _ in layout.incoming.iterdir())
        events = query(db, "SELECT COUNT(*) FROM events")[0][0]
        busy = query(db, "SELECT COUNT(*) FROM items WHERE state IN ('pending', 'inflight')")[0][0]
        if left == 0 and events >= written and busy == 0:
            break
        if time.monotonic() > deadline or daemon.proc_exited():
            raise AssertionError(
                f"not quiet {DRAIN_TIMEOUT}s after the load: {left} file(s) in incoming/, "
                f"{events}/{written} events, {busy} item(s) busy\n{daemon.log()[-3000:]}"
            )
        time.sleep(0.2)
    catch_up = time.monotonic() - load.started - elapsed

    # No event lost, none recorded twice. The daemon counts an event after it committed the
    # row and unlinked the file: wait for the count before comparing it.
    wait_for(
        lambda: daemon.metric("hydra_cachix_bridge_events_received_total") >= written,
        timeout=30,
        message="every event counted",
    )
    received = daemon.metric("hydra_cachix_bridge_events_received_total")
    by_source = {
        source: daemon.metric("hydra_cachix_bridge_events_received_total", source=source)
        for source in ("hydra", "hook", "log")
    }
    rows, distinct = query(db, "SELECT COUNT(*), COUNT(DISTINCT spool_name) FROM events")[0]
    names = {row[0] for row in query(db, "SELECT spool_name FROM events")}
    assert received == written, f"metric says {received} events, producers wrote {written}"
    assert rows == written, f"{rows} event rows, producers wrote {written}"
    assert distinct == rows, f"{rows - distinct} duplicated event rows"
    assert names == load.names, (
        f"lost: {sorted(load.names - names)[:5]}, unknown: {sorted(names - load.names)[:5]}"
    )
    assert by_source["hydra"] == sum(1 for n in load.names if n.startswith("hydra-"))
    assert by_source["hydra"] + by_source["hook"] == written and by_source["log"] == 0
    assert daemon.metric("hydra_cachix_bridge_events_rejected_total") == 0

    # Every distinct (cache, path) is pushed, once in the queue, and present in its cache.
    expected = {(cache, path) for cache in CACHES for path in load.paths}
    items = dict(query(db, "SELECT cache || ' ' || path, state FROM items"))
    assert set(items) == {f"{c} {p}" for c, p in expected}
    assert set(items.values()) == {"pushed"}
    cache_dirs = {"team": fake_cachix / "team", "mirror": mirror}
    absent = [
        (c, p)
        for c, p in expected
        if not (cache_dirs[c] / f"{Path(p).name.split('-', 1)[0]}.narinfo").is_file()
    ]
    assert absent == [], absent[:5]
    pushes = daemon.metric("hydra_cachix_bridge_pushes_succeeded_total")
    failed = daemon.metric("hydra_cachix_bridge_pushes_failed_total")
    assert failed == 0

    # Nothing quarantined, no error in the log.
    assert list(layout.quarantine.iterdir()) == []
    log_text = daemon.log()
    bad = [
        line
        for line in log_text.splitlines()
        if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
    ]
    assert bad == [], bad[:10]

    # Memory stays flat: the peak of the last 20 s against that of the first 20 s after
    # warm-up.
    first = [kib for t, kib in load.rss if WARM_UP_SECONDS <= t < WARM_UP_SECONDS + WINDOW_SECONDS]
    last = [kib for t, kib in load.rss if elapsed - WINDOW_SECONDS <= t <= elapsed]
    assert len(first) >= WINDOW_SECONDS - 3 and len(last) >= WINDOW_SECONDS - 3
    all_rss = [kib for _, kib in load.rss]
    lag = max((int(sent - got) for _, sent, got in load.scrapes), default=0)
    report = {
        "producers": PRODUCERS,
        "producers_in_process": IN_PROCESS_PRODUCERS,
        "producers_enqueue_hydra": ENQUEUE_HYDRA_PRODUCERS,
        "producers_hook_script": HOOK_SCRIPT_PRODUCERS,
        "load_seconds": round(elapsed, 1),
        "events_written": written,
        "events_by_producer": load.by_producer,
        "events_by_source": by_source,
        "events_per_second": round(rate, 1),
        "catch_up_seconds": round(catch_up, 1),
        "distinct_paths": len(load.paths),
        "expected_items": len(expected),
        "pushes": int(pushes),
        "rss_min_mib": round(min(all_rss) / 1024, 1),
        "rss_max_mib": round(max(all_rss) / 1024, 1),
        "rss_first_window_max_mib": round(max(first) / 1024, 1),
        "rss_last_window_max_mib": round(max(last) / 1024, 1),
        "rss_samples": len(all_rss),
        "max_ingest_lag_events_at_scrape": lag,
        "daemon_log_lines": log_text.count("\n"),
        "seed": seed,
    }
    print(
        f"load: events={written} ({rate:.0f}/s over {elapsed:.0f}s; {load.by_producer}) "
        f"paths={len(load.paths)} items={len(expected)} pushes={int(pushes)} "
        f"rss min/max={report['rss_min_mib']}/{report['rss_max_mib']} MiB "
        f"(first/last window max {report['rss_first_window_max_mib']}/"
        f"{report['rss_last_window_max_mib']} MiB) catch-up={catch_up:.1f}s seed={seed}"
    )
    write_report("load.json", report)
    assert max(last) <= RSS_RATIO * max(first), (
        f"RSS grew: last {WINDOW_SECONDS:.0f}s max {max(last)} KiB > {RSS_RATIO} x "
        f"first window max {max(first)} KiB; samples {load.rss}"
    )


FIRST_USE_ROUNDS = 10
FIRST_USE_HOOKS = 6


def test_first_hook_runs_at_once_are_all_recorded(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    nix_available: None,
) -> None:
    """Builds that finish together on a fresh host: the hooks' first runs race on hook-tmp/.

    nix-daemon runs one post-build-hook per finished build in each of its processes (one
    per client connection, e.g. Hydra's concurrent builds), so several can start before the
    hook's private hook-tmp/ exists. Every one of them must still record its build.
    """
    (item,) = build(workdir, 1, prefix="first-hook")
    daemon = daemon_factory(f'[caches.c]\nbackend = "nix-copy"\nuri = "file://{tmp_path}/c"\n')
    rendered = bridge("hook-script", "--config", str(daemon.config), env=daemon.env)
    assert rendered.returncode == 0, rendered.stderr
    hook = tmp_path / "post-build-hook"
    hook.write_text(rendered.stdout)
    hook.chmod(0o755)
    hook_tmp = tmp_path / "state" / "spool" / "hook-tmp"
    env = dict(daemon.env, DRV_PATH=item.drv, OUT_PATHS="")
    complaints: list[str] = []
    for _ in range(FIRST_USE_ROUNDS):
        if hook_tmp.exists():
            hook_tmp.rmdir()  # a fresh host: the hook has never run
        procs = [
            subprocess.Popen(
                [str(hook)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(FIRST_USE_HOOKS)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0  # a hook must always exit 0
            complaints += [line for line in err.splitlines() if line.strip()]
    runs = FIRST_USE_ROUNDS * FIRST_USE_HOOKS
    incoming = tmp_path / "state" / "spool" / "incoming"
    written = runs - len(complaints)  # each complaint is a run that wrote nothing
    deadline = time.monotonic() + 20
    while any(incoming.iterdir()) or (
        daemon.metric("hydra_cachix_bridge_events_received_total", source="hook") < written
    ):
        assert time.monotonic() < deadline, "the daemon did not record what the hooks wrote"
        time.sleep(0.1)
    recorded = daemon.metric("hydra_cachix_bridge_events_received_total", source="hook")
    print(
        f"\nfirst hook runs at once: {runs} runs in {FIRST_USE_ROUNDS} rounds of "
        f"{FIRST_USE_HOOKS}, {int(recorded)} recorded, {len(complaints)} 'could not record'"
    )
    assert complaints == [] and recorded == runs, (
        f"{runs - int(recorded)} of {runs} hook runs were not recorded; the hooks said: "
        f"{complaints[:2]}"
    )
