"""Hostile post-build-hook environments (DRV_PATH, OUT_PATHS with arbitrary bytes) through
the generated sh hook run by /bin/sh and through `enqueue-hook`, then the daemon's ingest.
Shared properties and harness: tests/reliability/hostile.py."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from bridge.cli import main as cli_main
from bridge.hookscript import render_hook_script
from tests.reliability.hostile import (
    EXAMPLES,
    INJECTIONS,
    Harness,
    Violations,
    assert_no_canary,
    check_ingest,
    hostile_module,
    many,
    new_report,
)
from tests.reliability.hostile_strategies import good_drvs, good_paths, hostile_paths

CASES, REPORT = new_report()


@pytest.fixture(scope="module", autouse=True)
def _hostile_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with hostile_module(__file__, REPORT, tmp_path_factory.mktemp("hypothesis-home")):
        yield


env_bytes = st.one_of(
    st.none(),
    st.just(b""),
    good_drvs.map(str.encode),
    hostile_paths().map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=80),
    st.sampled_from(INJECTIONS).map(str.encode),
).map(lambda b: None if b is None else b.replace(b"\x00", b""))


@st.composite
def out_paths_bytes(draw: st.DrawFn) -> bytes | None:
    if draw(st.integers(0, 5)) == 0:
        return draw(env_bytes)
    parts = draw(
        st.lists(
            st.one_of(good_paths.map(str.encode), env_bytes.map(lambda b: b or b"")),
            max_size=4,
        )
    )
    sep = draw(st.sampled_from([b" ", b"  ", b"\t", b"\n"]))
    return sep.join(parts).replace(b"\x00", b"")


# ============================================================================ (c) hook environments


def run_hook(
    hook: Path, cwd: Path, drv: bytes | None, outs: bytes | None
) -> subprocess.CompletedProcess[bytes]:
    env: dict[bytes, bytes] = {b"PATH": os.environb[b"PATH"], b"LC_ALL": b"C"}
    if drv is not None:
        env[b"DRV_PATH"] = drv
    if outs is not None:
        env[b"OUT_PATHS"] = outs
    return subprocess.run(
        ["/bin/sh", str(hook)], env=env, cwd=cwd, capture_output=True, timeout=30, check=False
    )


def hook_files_to_incoming(h: Harness, v: Violations, ex: str) -> None:
    """Move what the hook wrote into its own directory into (this private) incoming/, where
    check_ingest looks; each file must be one complete line."""
    for name in os.listdir(h.layout.hook):
        if not (h.layout.hook / name).read_bytes().endswith(b"\n"):
            v.add("hook left an incomplete file", ex)
        os.rename(h.layout.hook / name, h.layout.incoming / name)


def test_hook_environments_through_the_sh_hook(tmp_path: Path) -> None:
    """(c) DRV_PATH/OUT_PATHS with arbitrary bytes through the generated hook run by /bin/sh,
    then through the daemon's ingest: exit 0 always; recorded (valid paths only) or
    quarantined; one complete file per build in the hook's directory; no canary."""
    h = Harness(tmp_path)
    v = Violations("hook_sh", REPORT)
    hook = tmp_path / "post-build-hook"
    hook.write_text(render_hook_script(h.layout))
    hook.chmod(0o755)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    outcomes: Counter[str] = Counter()
    started = time.monotonic()

    @many()
    @given(drv=env_bytes, outs=out_paths_bytes())
    def run(drv: bytes | None, outs: bytes | None) -> None:
        CASES["hook_env_sh"] += 1
        ex = f"DRV_PATH={drv!r} OUT_PATHS={outs!r}"
        done = run_hook(hook, cwd, drv, outs)
        if done.returncode != 0:
            v.add(f"hook exited {done.returncode}", ex)
        hook_files_to_incoming(h, v, ex)
        files = h.incoming()
        if not files:
            if b"could not record" not in done.stderr:
                v.add("hook recorded nothing and said nothing", ex)
            outcomes["not recorded"] += 1
            return
        if len(files) != 1:
            v.add(f"hook wrote {len(files)} files", ex)
            h.park_leftovers()
            return
        name = os.fsdecode(files[0])
        data = (h.layout.incoming / name).read_bytes()
        old = time.time() - 60
        os.utime(h.layout.incoming / name, (old, old))
        outcomes[str(check_ingest(h, name, data, v))] += 1

    try:
        run()
        elapsed = time.monotonic() - started
        REPORT.setdefault("outcomes", {})["hook_env_sh"] = dict(outcomes)
        REPORT["hook_env_sh_seconds"] = round(elapsed, 1)
        assert_no_canary()
        assert not (cwd / "CANARY").exists()
        v.check()
        assert CASES["hook_env_sh"] >= EXAMPLES
        # Both branches well exercised (the generator favours hostile input).
        assert outcomes["recorded"] > 20 and outcomes["quarantined"] > 50, outcomes
    finally:
        h.close()


def test_hook_environments_through_enqueue_hook_in_process(tmp_path: Path) -> None:
    """(c) The same environments through `enqueue-hook` (click command, in process): exit 0
    always; recorded and then recorded or quarantined by the daemon, or a warning that the
    build was not recorded (environment bytes that are not UTF-8)."""
    h = Harness(tmp_path)
    v = Violations("hook_enqueue_hook", REPORT)
    runner = CliRunner()
    outcomes: Counter[str] = Counter()

    @many()
    @given(drv=env_bytes, outs=out_paths_bytes())
    def run(drv: bytes | None, outs: bytes | None) -> None:
        CASES["hook_env_enqueue_hook"] += 1
        ex = f"DRV_PATH={drv!r} OUT_PATHS={outs!r}"
        env = {
            "DRV_PATH": None if drv is None else os.fsdecode(drv),
            "OUT_PATHS": None if outs is None else os.fsdecode(outs),
        }
        result = runner.invoke(cli_main, ["enqueue-hook", "--config", str(h.config_file)], env=env)
        if result.exit_code != 0:
            v.add(f"enqueue-hook exited {result.exit_code}: {result.exception!r}", ex)
        hook_files_to_incoming(h, v, ex)
        files = h.incoming()
        if not files:
            if "build not recorded" not in result.output:
                v.add("enqueue-hook recorded nothing and said nothing", ex)
            outcomes["not recorded"] += 1
            return
        name = os.fsdecode(files[0])
        data = (h.layout.incoming / name).read_bytes()
        outcomes[str(check_ingest(h, name, data, v))] += 1

    try:
        run()
        REPORT.setdefault("outcomes", {})["hook_env_enqueue_hook"] = dict(outcomes)
        assert_no_canary()
        v.check()
        assert CASES["hook_env_enqueue_hook"] >= EXAMPLES
        # Both branches well exercised (the generator favours hostile input).
        assert outcomes["recorded"] > 20 and outcomes["quarantined"] > 50, outcomes
    finally:
        h.close()
