"""Tests for bridge.hookscript: the generated POSIX sh post-build-hook, run for real."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.events import Event, EventRejected, decode_json, parse_spool_document
from bridge.hookscript import render_hook_script
from bridge.spool import SpoolLayout, is_candidate
from tests.nixhelpers import build, build_multi_output, hook_gets_out_paths, nix_version

HASH_A = "0123456789abcdfghijklmnpqrsvwxyz"
HASH_B = "zyxwvsrqpnmlkjihgfdcba9876543210"
DRV = f"/nix/store/{HASH_A}-hello-2.12.1.drv"
OUT = f"/nix/store/{HASH_B}-hello-2.12.1"
DEV = f"/nix/store/{HASH_B[::-1]}-hello-2.12.1-dev"
FALLBACK = 12345.0


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def make_hook(tmp_path: Path, layout: SpoolLayout) -> Path:
    hook = tmp_path / "bin" / "post-build-hook"
    hook.parent.mkdir(exist_ok=True)
    hook.write_text(render_hook_script(layout))
    hook.chmod(0o755)
    return hook


def run_hook(hook: Path, cwd: Path, *, via_sh: bool = True, **env: str | bytes | None) -> Run:
    """Run the hook with a minimal environment; None leaves a variable unset."""
    environ: dict[str | bytes, str | bytes] = {"PATH": os.environ["PATH"], "LC_ALL": "C"}
    for key, value in env.items():
        if value is not None:
            environ[key] = value
    args = ["/bin/sh", str(hook)] if via_sh else [str(hook)]
    done = subprocess.run(args, env=environ, cwd=cwd, capture_output=True, timeout=30, check=False)
    return Run(
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )


def incoming_files(layout: SpoolLayout) -> list[Path]:
    """The hook's event files: in its own directory (incoming/ is for the other producers)."""
    assert list(layout.incoming.iterdir()) == [] if layout.incoming.is_dir() else True
    return sorted(layout.hook.iterdir())


def parse_file(path: Path) -> Event:
    return parse_spool_document(decode_json(path.read_bytes()), fallback_time=FALLBACK)


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.ensure()
    return spool


@pytest.fixture
def hook(tmp_path: Path, layout: SpoolLayout) -> Path:
    return make_hook(tmp_path, layout)


class TestRender:
    def test_script_is_posix_sh_bound_to_the_spool(self, layout: SpoolLayout) -> None:
        script = render_hook_script(layout)
        assert script.startswith("#!/bin/sh\n")
        assert f"dir={layout.hook}\n" in script
        assert "__HOOKDIR__" not in script
        assert script.rstrip().endswith("exit 0")

    def test_script_passes_sh_syntax_check(self, tmp_path: Path, layout: SpoolLayout) -> None:
        hook = make_hook(tmp_path, layout)
        done = subprocess.run(["/bin/sh", "-n", str(hook)], capture_output=True, check=False)
        assert done.returncode == 0, done.stderr

    def test_spool_path_is_shell_quoted(self, tmp_path: Path) -> None:
        script = render_hook_script(SpoolLayout(tmp_path / "a b'c$(x)"))
        line = next(x for x in script.splitlines() if x.startswith("dir="))
        done = subprocess.run(
            ["/bin/sh", "-c", line + '\nprintf %s "$dir"'],
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout == str(tmp_path / "a b'c$(x)" / "hook")

    def test_configured_hook_directory(self, tmp_path: Path) -> None:
        script = render_hook_script(SpoolLayout(tmp_path / "s", tmp_path / "elsewhere"))
        assert f"dir={tmp_path / 'elsewhere'}\n" in script

    def test_no_fork_on_the_normal_path(self) -> None:
        """Between the start and `exit 0` of a plain event only shell builtins run."""
        script = render_hook_script(SpoolLayout(Path("/s")))
        normal = script[script.index("umask 027") : script.index("    exit 0")]
        normal = "\n".join(x for x in normal.splitlines() if not x.lstrip().startswith("#"))
        for external in ("mv ", "mkdir", "mktemp", "cat ", "$(", "`"):
            assert external not in normal, external


class TestNormalEvents:
    def test_drv_and_out_paths(self, hook: Path, layout: SpoolLayout, tmp_path: Path) -> None:
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=f"{OUT} {DEV}")
        assert run.returncode == 0
        assert run.stderr == ""
        [path] = incoming_files(layout)
        assert is_candidate(path.name) and path.name.endswith(".json")
        assert stat.S_ISREG(os.lstat(path).st_mode)
        assert os.lstat(path).st_mode & 0o007 == 0
        event = parse_file(path)
        assert event == Event(
            source="hook", received_at=FALLBACK, out_paths=(OUT, DEV), drv_path=DRV
        )
        # Complete: the daemon takes a hook file once its final newline is there.
        assert path.read_bytes().endswith(b"}\n")

    def test_run_directly_as_executable(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        run = run_hook(hook, tmp_path, via_sh=False, DRV_PATH=DRV, OUT_PATHS=OUT)
        assert run.returncode == 0
        [path] = incoming_files(layout)
        assert parse_file(path).out_paths == (OUT,)

    def test_empty_out_paths_gives_drv_only_event(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        # What Debian's Nix 2.8.0 passes (REFERENCE.md §2).
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS="")
        assert run.returncode == 0 and run.stderr == ""
        [path] = incoming_files(layout)
        event = parse_file(path)
        assert event.drv_path == DRV
        assert event.out_paths == ()
        assert event.needs_output_resolution

    def test_unset_out_paths_gives_drv_only_event(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        run = run_hook(hook, tmp_path, DRV_PATH=DRV)
        assert run.returncode == 0
        [path] = incoming_files(layout)
        assert parse_file(path).needs_output_resolution

    def test_several_builds_give_several_files(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        drvs = [f"/nix/store/{HASH_A}-pkg{i}.drv" for i in range(3)]
        for drv in drvs:
            assert run_hook(hook, tmp_path, DRV_PATH=drv, OUT_PATHS=OUT).returncode == 0
        events = [parse_file(p) for p in incoming_files(layout)]
        assert sorted(e.drv_path or "" for e in events) == sorted(drvs)

    def test_longest_valid_derivation_name_is_recorded(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        # Nix allows store path names up to 211 characters.
        drv = f"/nix/store/{HASH_A}-{'n' * 207}.drv"
        run = run_hook(hook, tmp_path, DRV_PATH=drv, OUT_PATHS=OUT)
        assert run.returncode == 0
        [path] = incoming_files(layout)
        assert parse_file(path).drv_path == drv

    def test_spool_path_with_spaces_and_quote(self, tmp_path: Path) -> None:
        layout = SpoolLayout(tmp_path / "my spool's dir $HOME")
        layout.ensure()
        hook = make_hook(tmp_path, layout)
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=OUT)
        assert run.returncode == 0 and run.stderr == ""
        [path] = incoming_files(layout)
        assert parse_file(path).drv_path == DRV
        assert not (tmp_path / "my spool's dir").exists()


class TestSpoolProblems:
    def test_missing_spool(self, tmp_path: Path) -> None:
        layout = SpoolLayout(tmp_path / "no-such-spool")
        hook = make_hook(tmp_path, layout)
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=OUT)
        assert run.returncode == 0
        assert "hydra-cachix-bridge: could not record" in run.stderr
        assert DRV in run.stderr
        assert not layout.root.exists()

    def test_hook_directory_missing(self, hook: Path, layout: SpoolLayout, tmp_path: Path) -> None:
        layout.hook.rmdir()
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=OUT)
        assert run.returncode == 0
        assert "could not record" in run.stderr and "not a directory of the hook's" in run.stderr
        assert not layout.hook.exists()  # the hook never makes it: root's init does

    def test_hook_directory_is_a_regular_file(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        layout.hook.rmdir()
        layout.hook.write_text("not a directory")
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=OUT)
        assert run.returncode == 0 and "could not record" in run.stderr
        assert layout.hook.read_text() == "not a directory"

    def test_spool_root_is_a_file(self, tmp_path: Path) -> None:
        layout = SpoolLayout(tmp_path / "spool-file")
        layout.root.write_text("x")
        hook = make_hook(tmp_path, layout)
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=OUT)
        assert run.returncode == 0
        assert "could not record" in run.stderr
        assert layout.root.read_text() == "x"

    def test_symlink_as_hook_directory_is_not_followed(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        elsewhere = tmp_path / "attacker"
        elsewhere.mkdir()
        layout.hook.rmdir()
        layout.hook.symlink_to(elsewhere)
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=OUT)
        assert run.returncode == 0
        assert "could not record" in run.stderr
        assert list(elsewhere.iterdir()) == []

    def test_hook_directory_owned_by_someone_else_is_not_used(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        os.chown(layout.hook, 65534, 65534)
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=OUT)
        assert run.returncode == 0
        assert "could not record" in run.stderr
        assert list(layout.hook.iterdir()) == []

    def test_incoming_is_not_touched(self, hook: Path, layout: SpoolLayout, tmp_path: Path) -> None:
        layout.incoming.rmdir()
        layout.incoming.write_text("not a directory")
        run = run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=OUT)
        assert run.returncode == 0 and run.stderr == ""
        assert layout.incoming.read_text() == "not a directory"
        assert len(list(layout.hook.iterdir())) == 1

    def test_a_failed_write_leaves_nothing_and_exits_zero(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        """A full disk (here: a file size limit) gives a partial line: the hook removes it."""

        def limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))

        for shell in ("dash", "bash"):
            done = subprocess.run(
                [shell, str(hook)],
                env={"PATH": os.environ["PATH"], "DRV_PATH": DRV, "OUT_PATHS": OUT},
                preexec_fn=limit,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert done.returncode == 0, shell
            assert "could not record" in done.stderr and "not writable or full" in done.stderr
            assert list(layout.hook.iterdir()) == [], shell

    def test_files_are_not_readable_by_others(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        run_hook(hook, tmp_path, DRV_PATH=DRV, OUT_PATHS=OUT)
        [path] = incoming_files(layout)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640


class TestConcurrentHooks:
    def test_many_hooks_at_once_each_record_one_complete_event(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        """Nix >= 2.35 runs hooks in parallel (up to max-jobs): 200 at once, 20 deep."""
        drvs = [f"/nix/store/{HASH_A[:-3]}{i:03d}-pkg{i}.drv" for i in range(200)]
        procs = []
        for index, drv in enumerate(drvs):
            env = {"PATH": os.environ["PATH"], "DRV_PATH": drv, "OUT_PATHS": OUT}
            procs.append(subprocess.Popen(["/bin/sh", str(hook)], env=env, cwd=tmp_path))
            if index % 20 == 19:
                assert all(p.wait(timeout=60) == 0 for p in procs)
                procs = []
        assert all(p.wait(timeout=60) == 0 for p in procs)
        files = incoming_files(layout)
        assert all(p.read_bytes().endswith(b"\n") for p in files)
        assert sorted(parse_file(p).drv_path or "" for p in files) == sorted(drvs)


HOSTILE = [
    '"; touch CANARY; echo "',
    "$(touch CANARY)",
    "`touch CANARY`",
    "'$(touch CANARY)'",
    '\\"$(touch CANARY)\\"',
    "a\\",
    "\\",
    '"',
    '"}, {"version":1,"kind":"hook","drv_path":"x',
    "line1\nline2\r\n\ttab",
    "%s%n%d%%",
    "-n",
    "*",
    "../../../etc/passwd",
    "h\u00e9llo \u2603",
    "${HOME}",
    "x; touch CANARY",
    "x|touch CANARY",
    "x && touch CANARY",
    "x\n$(touch CANARY)\n",
]


class TestHostileValues:
    def check(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path, drv: str | bytes, outs: str | bytes
    ) -> None:
        run = run_hook(hook, tmp_path, DRV_PATH=drv, OUT_PATHS=outs)
        assert run.returncode == 0
        assert not (tmp_path / "CANARY").exists(), "shell injection"
        assert not (layout.root / "CANARY").exists(), "shell injection"
        assert not (layout.incoming / "CANARY").exists(), "shell injection"
        for path in incoming_files(layout):
            with pytest.raises(EventRejected) as info:
                parse_file(path)
            assert info.value.reason in ("invalid_store_path", "invalid_json", "invalid_encoding")
        if not incoming_files(layout):
            # Not recorded: the hook must have said so.
            assert "could not record" in run.stderr

    @pytest.mark.parametrize("value", HOSTILE)
    def test_hostile_drv_path(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path, value: str
    ) -> None:
        self.check(hook, layout, tmp_path, value, OUT)

    @pytest.mark.parametrize("value", HOSTILE)
    def test_hostile_out_paths(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path, value: str
    ) -> None:
        self.check(hook, layout, tmp_path, DRV, f"{OUT} {value}")

    def test_hostile_drv_produces_a_file_the_daemon_rejects(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        self.check(hook, layout, tmp_path, '/nix/store/x"$(touch CANARY)`touch CANARY`.drv', OUT)
        [path] = incoming_files(layout)
        doc = decode_json(path.read_bytes())
        assert doc["kind"] == "hook"
        assert "$(touch CANARY)" in doc["drv_path"]

    def test_invalid_utf8_bytes(self, hook: Path, layout: SpoolLayout, tmp_path: Path) -> None:
        self.check(hook, layout, tmp_path, DRV, OUT.encode() + b" \xff\xfe$(touch CANARY)")

    @pytest.mark.parametrize(
        ("drv", "outs"),
        [
            # A control character inside an otherwise valid path must not be silently
            # dropped: that would turn it into a different, valid store path.
            (f"/nix/store/{HASH_A}-hel\nlo.drv", OUT),
            (DRV, f"/nix/store/{HASH_B}-hel\x01lo"),
        ],
    )
    def test_control_characters_are_not_dropped_into_a_valid_path(
        self, hook: Path, layout: SpoolLayout, tmp_path: Path, drv: str, outs: str
    ) -> None:
        self.check(hook, layout, tmp_path, drv, outs)


@pytest.mark.nix
def test_real_nix_post_build_hook(
    nix_available: None, tmp_path: Path, workdir: Path, layout: SpoolLayout
) -> None:
    hook = make_hook(tmp_path, layout)
    [built] = build(workdir, 1, prefix="hcb-hook", hook=hook)
    events = [parse_file(p) for p in incoming_files(layout)]
    mine = [e for e in events if e.drv_path == built.drv]
    assert len(mine) == 1, events
    # Only Nix 2.8.0 passes an empty OUT_PATHS (fixed in 2.8.1); the daemon then reads the
    # outputs from the .drv. Every later version fills it.
    expected = (built.out,) if hook_gets_out_paths() else ()
    assert mine[0].out_paths == expected, nix_version()
    assert mine[0].source == "hook"


@pytest.mark.nix
def test_real_nix_post_build_hook_with_two_outputs(
    nix_available: None, tmp_path: Path, workdir: Path, layout: SpoolLayout
) -> None:
    hook = make_hook(tmp_path, layout)
    built = build_multi_output(workdir, hook=hook)
    [event] = [e for e in map(parse_file, incoming_files(layout)) if e.drv_path == built.drv]
    if hook_gets_out_paths():
        # Space-separated, in the derivation's output order.
        assert sorted(event.out_paths) == sorted((built.out, built.dev)), nix_version()
    else:
        assert event.out_paths == (), nix_version()
