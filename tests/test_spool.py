"""Unit tests for bridge.spool: atomic writes, safe reads, quarantine and directory modes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from bridge.events import (
    EventRejected,
    decode_json,
    hook_envelope,
    hydra_envelope,
    parse_hydra_payload,
    parse_spool_document,
)
from bridge.spool import (
    SpoolLayout,
    SpoolUnavailable,
    event_file_name,
    is_candidate,
    quarantine,
    quarantine_bytes,
    read_event_file,
    unsafe_directory,
    write_event,
    write_hook_event,
)
from tests.nixhelpers import Built, hydra_payload

DRV = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv"
OUT = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hello"
NOW = 1_700_000_000.0


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.ensure()
    return spool


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def read_in_thread(path: Path, max_bytes: int, seconds: float = 5.0) -> Any:
    """Run read_event_file in a thread; fail if it blocks. Returns the result or exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(read_event_file(path, max_bytes))
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"read_event_file blocked on {path}"
    return outcome[0]


# --------------------------------------------------------------------------- layout


class TestLayout:
    def test_paths(self, tmp_path: Path) -> None:
        spool = SpoolLayout(tmp_path)
        assert spool.incoming == tmp_path / "incoming"
        assert spool.tmp == tmp_path / "tmp"
        assert spool.quarantine == tmp_path / "quarantine"

    def test_ensure_private_modes(self, tmp_path: Path) -> None:
        spool = SpoolLayout(tmp_path / "a" / "b" / "spool")
        assert not spool.incoming.is_dir()
        spool.ensure()
        assert spool.incoming.is_dir()
        for directory in (spool.root, spool.incoming, spool.tmp, spool.quarantine):
            assert directory.is_dir()
            assert mode(directory) == 0o700, (directory, oct(mode(directory)))

    def test_ensure_group_writable_modes(self, tmp_path: Path) -> None:
        spool = SpoolLayout(tmp_path / "spool")
        spool.ensure(group_writable=True)
        for directory in (spool.root, spool.incoming, spool.tmp, spool.quarantine):
            assert mode(directory) == 0o3770, (directory, oct(mode(directory)))
            st = os.stat(directory).st_mode
            assert st & stat.S_ISGID and st & stat.S_ISVTX
            assert not st & stat.S_IRWXO

    def test_ensure_fixes_existing_modes_and_is_idempotent(self, tmp_path: Path) -> None:
        spool = SpoolLayout(tmp_path / "spool")
        spool.ensure(group_writable=True)
        (spool.incoming / "keep.json").write_text("{}")
        os.chmod(spool.tmp, 0o777)
        spool.ensure()
        spool.ensure()
        for directory in (spool.root, spool.incoming, spool.tmp, spool.quarantine):
            assert mode(directory) == 0o700
        assert (spool.incoming / "keep.json").read_text() == "{}"

    def test_hook_directory(self, tmp_path: Path) -> None:
        assert SpoolLayout(tmp_path).hook == tmp_path / "hook"
        assert SpoolLayout(tmp_path, tmp_path / "elsewhere").hook == tmp_path / "elsewhere"

    def test_ensure_private_makes_the_hook_directory(self, tmp_path: Path) -> None:
        spool = SpoolLayout(tmp_path / "spool")
        spool.ensure()
        assert mode(spool.hook) == 0o700 and os.lstat(spool.hook).st_uid == os.geteuid()

    def test_ensure_shared_leaves_the_hook_directory_to_root(self, tmp_path: Path) -> None:
        spool = SpoolLayout(tmp_path / "spool")
        spool.ensure(group_writable=True)
        assert not spool.hook.exists()

    def test_ensure_keeps_a_root_made_by_init(self, tmp_path: Path) -> None:
        spool = SpoolLayout(tmp_path / "spool")
        spool.ensure(group_writable=True)
        os.chmod(spool.root, 0o755)
        spool.ensure(group_writable=True)
        assert mode(spool.root) == 0o755

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs a directory owned by someone else")
    def test_ensure_refuses_a_loose_root_it_does_not_own(self, shared_tmp: Path) -> None:
        from tests.asuser import NOBODY, run_as

        spool = SpoolLayout(shared_tmp / "spool")
        spool.ensure(group_writable=True)
        os.chmod(spool.root, 0o2775)  # group-writable, no sticky bit: anyone there may swap

        def ensure() -> str:
            try:
                spool.ensure(group_writable=True)
            except PermissionError as exc:
                return str(exc)
            return "ok"

        message = run_as(NOBODY, NOBODY, ensure)
        assert "without the sticky bit" in message and str(spool.root) in message
        # Its owner fixes it.
        spool.ensure(group_writable=True)
        assert mode(spool.root) == 0o3770


# --------------------------------------------------------------------------- names


class TestNames:
    @pytest.mark.parametrize("name", ["hydra-1-2-ab.json", "hook-1-x.json", "x", "a.json.1"])
    def test_candidates(self, name: str) -> None:
        assert is_candidate(name)

    @pytest.mark.parametrize(
        "name", [".hydra-1.json", ".", "..", "x.tmp", "hydra-1.json.tmp", "x.json.reason"]
    )
    def test_not_candidates(self, name: str) -> None:
        assert not is_candidate(name)

    def test_event_file_names_are_unique_candidates(self) -> None:
        names = {event_file_name("hydra") for _ in range(500)}
        assert len(names) == 500
        for name in names:
            assert name.startswith("hydra-")
            assert name.endswith(".json")
            assert is_candidate(name)
            assert f"-{os.getpid()}-" in name


# --------------------------------------------------------------------------- write_event


class TestWriteEvent:
    def test_writes_complete_file_into_incoming(self, layout: SpoolLayout) -> None:
        doc = hook_envelope(DRV, OUT, NOW)
        target = write_event(layout, "hook", doc)
        assert target.parent == layout.incoming
        assert target.name.startswith("hook-") and target.name.endswith(".json")
        assert json.loads(target.read_bytes()) == doc
        assert list(layout.tmp.iterdir()) == []
        assert list(layout.incoming.iterdir()) == [target]
        assert stat.S_ISREG(os.lstat(target).st_mode)
        assert mode(target) & 0o007 == 0, "event files must not be world-accessible"

    def test_written_file_is_accepted_by_the_daemon(self, layout: SpoolLayout) -> None:
        payload = hydra_payload(5, Built("hello", DRV, OUT))
        target = write_event(layout, "hydra", hydra_envelope(payload, NOW))
        raw = read_event_file(target, 1024 * 1024)
        event = parse_spool_document(decode_json(raw.data), fallback_time=0.0)
        assert event == parse_hydra_payload(payload, NOW)

    def test_non_ascii_is_written_as_json_escapes(self, layout: SpoolLayout) -> None:
        target = write_event(layout, "hydra", {"description": "caf\u00e9 \u2603"})
        assert target.read_bytes().isascii()
        assert decode_json(target.read_bytes()) == {"description": "caf\u00e9 \u2603"}

    def test_undecodable_environment_text_still_makes_valid_json(self, layout: SpoolLayout) -> None:
        # os.environ holds undecodable bytes as lone surrogates; the file stays valid JSON
        # and the daemon rejects it with a reason instead of the producer failing.
        target = write_event(layout, "hook", {"drv_path": "\udcff", "out_paths": ""})
        with pytest.raises(EventRejected) as caught:
            decode_json(target.read_bytes())
        assert caught.value.reason == "invalid_encoding"

    def test_many_writes_never_collide(self, layout: SpoolLayout) -> None:
        paths = {write_event(layout, "hook", {"i": i}) for i in range(200)}
        assert len(paths) == 200
        assert sorted(json.loads(p.read_text())["i"] for p in paths) == list(range(200))
        assert list(layout.tmp.iterdir()) == []

    def test_missing_spool(self, tmp_path: Path) -> None:
        spool = SpoolLayout(tmp_path / "does-not-exist")
        with pytest.raises(SpoolUnavailable) as info:
            write_event(spool, "hook", {"a": 1})
        message = str(info.value)
        assert str(spool.root) in message
        assert "incoming/" in message and "has the daemon run once" in message
        assert not spool.root.exists()

    @pytest.mark.parametrize("missing", ["incoming", "tmp"])
    def test_missing_subdirectory(self, layout: SpoolLayout, missing: str) -> None:
        (layout.root / missing).rmdir()
        with pytest.raises(SpoolUnavailable, match="is missing"):
            write_event(layout, "hook", {"a": 1})
        remaining = layout.incoming if missing == "tmp" else layout.tmp
        assert list(remaining.iterdir()) == []

    def test_incoming_is_a_file(self, layout: SpoolLayout) -> None:
        layout.incoming.rmdir()
        layout.incoming.write_text("x")
        with pytest.raises(SpoolUnavailable):
            write_event(layout, "hook", {"a": 1})
        assert list(layout.tmp.iterdir()) == []
        assert layout.incoming.read_text() == "x"

    def test_failed_rename_leaves_nothing_in_tmp(self, layout: SpoolLayout) -> None:
        # tmp on another filesystem (tmpfs) makes the rename fail with EXDEV.
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm")
        other = Path(tempfile.mkdtemp(dir="/dev/shm"))
        try:
            if os.stat(other).st_dev == os.stat(layout.root).st_dev:
                pytest.skip("/dev/shm is on the same filesystem")
            layout.tmp.rmdir()
            layout.tmp.symlink_to(other)
            with pytest.raises(SpoolUnavailable) as info:
                write_event(layout, "hook", {"a": 1})
            assert str(layout.root) in str(info.value)
            assert list(other.iterdir()) == []
            assert list(layout.incoming.iterdir()) == []
        finally:
            shutil.rmtree(other)

    @pytest.mark.parametrize(
        "raw",
        [
            # Numbers that overflow a double: JSON allows them, Python decodes them to inf.
            b'"metrics": [{"name": "x", "unit": "bytes", "value": 1e400}]',
            # A lone surrogate escape: valid JSON syntax, but not encodable as UTF-8.
            b'"description": "bad \\ud800 text"',
        ],
    )
    def test_every_accepted_hydra_payload_survives_the_spool(
        self, layout: SpoolLayout, raw: bytes
    ) -> None:
        """What enqueue-hydra accepts (decode_json + parse_hydra_payload) and writes with
        write_event must be accepted by the daemon when it reads the file back: otherwise
        the producer reports success and the daemon quarantines the build."""
        base = json.dumps(hydra_payload(9, Built("hello", DRV, OUT))).encode()
        data = base[:-1] + b", " + raw + b"}"
        try:
            payload = decode_json(data)
            event = parse_hydra_payload(payload, NOW)
        except EventRejected:
            return  # rejected at the producer: visible in Hydra, fine
        target = write_event(layout, "hydra", hydra_envelope(payload, NOW))
        raw_file = read_event_file(target, 1024 * 1024)
        assert parse_spool_document(decode_json(raw_file.data), 0.0) == event


# --------------------------------------------------------------------------- read_event_file


class TestReadEventFile:
    def test_regular_file(self, layout: SpoolLayout) -> None:
        path = layout.incoming / "a.json"
        path.write_bytes(b'{"x": 1}')
        os.utime(path, (1000, 2000))
        raw = read_event_file(path, 1024)
        assert raw.path == path
        assert raw.data == b'{"x": 1}'
        assert raw.mtime == 2000

    def test_empty_file(self, layout: SpoolLayout) -> None:
        path = layout.incoming / "empty.json"
        path.touch()
        assert read_event_file(path, 1024).data == b""

    def test_exactly_max_bytes_is_accepted(self, layout: SpoolLayout) -> None:
        path = layout.incoming / "a.json"
        path.write_bytes(b"x" * 300)
        assert len(read_event_file(path, 300).data) == 300

    def test_large_file_read_in_full(self, layout: SpoolLayout) -> None:
        path = layout.incoming / "big.json"
        data = os.urandom(200_000)
        path.write_bytes(data)
        assert read_event_file(path, 200_000).data == data

    def test_oversized_file(self, layout: SpoolLayout) -> None:
        path = layout.incoming / "big.json"
        path.write_bytes(b"x" * 301)
        exc = read_in_thread(path, 300)
        assert isinstance(exc, EventRejected)
        assert exc.reason == "too_large"
        assert "301" in exc.message and "300" in exc.message

    def test_symlink_to_regular_file_is_rejected(self, layout: SpoolLayout, tmp_path: Path) -> None:
        target = tmp_path / "secret"
        target.write_text('{"version": 1}')
        link = layout.incoming / "link.json"
        link.symlink_to(target)
        exc = read_in_thread(link, 1024)
        assert isinstance(exc, EventRejected)
        assert exc.reason == "not_regular_file"
        assert "symbolic link" in exc.message

    def test_dangling_symlink_is_rejected(self, layout: SpoolLayout) -> None:
        link = layout.incoming / "dangling.json"
        link.symlink_to(layout.root / "nowhere")
        exc = read_in_thread(link, 1024)
        assert isinstance(exc, EventRejected)
        assert exc.reason == "not_regular_file"

    def test_fifo_is_rejected_without_blocking(self, layout: SpoolLayout) -> None:
        fifo = layout.incoming / "fifo.json"
        os.mkfifo(fifo)
        exc = read_in_thread(fifo, 1024)
        assert isinstance(exc, EventRejected)
        assert exc.reason == "not_regular_file"
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    def test_symlink_to_fifo_is_rejected_without_blocking(
        self, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        link = layout.incoming / "l.json"
        link.symlink_to(fifo)
        exc = read_in_thread(link, 1024)
        assert isinstance(exc, EventRejected)
        assert exc.reason == "not_regular_file"

    def test_directory_is_rejected(self, layout: SpoolLayout) -> None:
        directory = layout.incoming / "dir.json"
        directory.mkdir()
        exc = read_in_thread(directory, 1024)
        assert isinstance(exc, EventRejected)
        assert exc.reason == "not_regular_file"
        assert "not a regular file" in exc.message

    def test_device_is_rejected_without_blocking(self) -> None:
        exc = read_in_thread(Path("/dev/zero"), 1024)
        assert isinstance(exc, EventRejected)
        assert exc.reason == "not_regular_file"

    def test_missing_file_raises_oserror(self, layout: SpoolLayout) -> None:
        with pytest.raises(FileNotFoundError):
            read_event_file(layout.incoming / "gone.json", 1024)


# --------------------------------------------------------------------------- quarantine


def reason_of(path: Path) -> dict[str, Any]:
    data = json.loads(Path(f"{path}.reason").read_text())
    assert isinstance(data, dict)
    return data


class TestQuarantine:
    def test_moves_file_and_writes_reason(self, layout: SpoolLayout) -> None:
        path = layout.incoming / "hydra-1.json"
        path.write_bytes(b"{broken")
        target = quarantine(layout, path, "invalid_json", "invalid JSON: x", NOW)
        assert not path.exists()
        assert target == layout.quarantine / "hydra-1.json"
        assert target.read_bytes() == b"{broken"
        assert reason_of(target) == {
            "file": "hydra-1.json",
            "quarantined_as": "hydra-1.json",
            "reason": "invalid_json",
            "message": "invalid JSON: x",
            "quarantined_at": NOW,
        }
        assert mode(Path(f"{target}.reason")) & 0o007 == 0

    def test_creates_quarantine_directory(self, layout: SpoolLayout) -> None:
        layout.quarantine.rmdir()
        path = layout.incoming / "x.json"
        path.write_text("x")
        target = quarantine(layout, path, "invalid_json", "m", NOW)
        assert target.parent == layout.quarantine and target.read_text() == "x"

    def test_name_collisions(self, layout: SpoolLayout) -> None:
        targets = []
        for i in range(3):
            path = layout.incoming / "same.json"
            path.write_text(str(i))
            targets.append(quarantine(layout, path, "invalid_event", f"m{i}", NOW + i))
        assert [t.name for t in targets] == ["same.json", "same.json.1", "same.json.2"]
        for i, target in enumerate(targets):
            assert target.read_text() == str(i)
            assert reason_of(target)["message"] == f"m{i}"
            assert reason_of(target)["file"] == "same.json"

    def test_collision_with_a_stray_reason_file(self, layout: SpoolLayout) -> None:
        (layout.quarantine / "x.json.reason").write_text("old")
        path = layout.incoming / "x.json"
        path.write_text("new")
        target = quarantine(layout, path, "invalid_json", "m", NOW)
        assert target.name == "x.json.1"
        assert (layout.quarantine / "x.json.reason").read_text() == "old"
        assert reason_of(target)["reason"] == "invalid_json"

    def test_collision_with_a_dangling_symlink(self, layout: SpoolLayout, tmp_path: Path) -> None:
        victim = tmp_path / "victim"
        (layout.quarantine / "x.json").symlink_to(victim)
        path = layout.incoming / "x.json"
        path.write_text("payload")
        target = quarantine(layout, path, "invalid_json", "m", NOW)
        assert target.name == "x.json.1"
        assert not victim.exists()

    def test_reason_symlink_is_never_followed(self, layout: SpoolLayout, tmp_path: Path) -> None:
        victim = tmp_path / "victim"
        victim.write_text("keep")
        (layout.quarantine / "y.json.reason").symlink_to(victim)
        path = layout.incoming / "y.json"
        path.write_text("p")
        target = quarantine(layout, path, "invalid_json", "m", NOW)
        assert target.name == "y.json.1"
        assert victim.read_text() == "keep"

    def test_symlink_is_moved_not_followed(self, layout: SpoolLayout, tmp_path: Path) -> None:
        target_file = tmp_path / "outside.txt"
        target_file.write_text("precious")
        link = layout.incoming / "evil.json"
        link.symlink_to(target_file)
        moved = quarantine(layout, link, "not_regular_file", "symbolic link", NOW)
        assert moved.is_symlink()
        assert os.readlink(moved) == str(target_file)
        assert not os.path.lexists(link)
        assert target_file.read_text() == "precious"
        assert list(tmp_path.glob("outside*")) == [target_file]
        assert reason_of(moved)["reason"] == "not_regular_file"

    def test_symlink_to_directory_is_moved_not_followed(
        self, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        outside = tmp_path / "outside-dir"
        outside.mkdir()
        (outside / "f").write_text("f")
        link = layout.incoming / "d.json"
        link.symlink_to(outside)
        moved = quarantine(layout, link, "not_regular_file", "m", NOW)
        assert moved.is_symlink()
        assert sorted(p.name for p in outside.iterdir()) == ["f"]

    def test_fifo_and_directory_can_be_quarantined(self, layout: SpoolLayout) -> None:
        fifo = layout.incoming / "fifo.json"
        os.mkfifo(fifo)
        directory = layout.incoming / "dir.json"
        directory.mkdir()
        moved_fifo = quarantine(layout, fifo, "not_regular_file", "m", NOW)
        moved_dir = quarantine(layout, directory, "not_regular_file", "m", NOW)
        assert stat.S_ISFIFO(os.lstat(moved_fifo).st_mode)
        assert moved_dir.is_dir()
        assert list(layout.incoming.iterdir()) == []

    @pytest.mark.parametrize(
        ("name", "expected"), [(".hidden.json", "_hidden.json"), ("x.tmp", "_x.tmp")]
    )
    def test_non_candidate_names_are_renamed(
        self, layout: SpoolLayout, name: str, expected: str
    ) -> None:
        path = layout.incoming / name
        path.write_text("x")
        target = quarantine(layout, path, "invalid_json", "m", NOW)
        assert target.name == expected
        assert reason_of(target)["file"] == name

    def test_message_is_stored_verbatim_as_json(self, layout: SpoolLayout) -> None:
        path = layout.incoming / "m.json"
        path.write_text("x")
        message = 'quote " backslash \\ newline \n unicode \u2603'
        target = quarantine(layout, path, "invalid_event", message, NOW)
        assert reason_of(target)["message"] == message


class TestQuarantineBytes:
    def test_writes_data_and_reason(self, layout: SpoolLayout) -> None:
        data = b"\xff\xfe not json"
        target = quarantine_bytes(layout, "hydra", data, "invalid_encoding", "not UTF-8", NOW)
        assert target.parent == layout.quarantine
        assert target.name.startswith("hydra-") and target.name.endswith(".json")
        assert target.read_bytes() == data
        assert reason_of(target) == {
            "file": target.name,
            "quarantined_as": target.name,
            "reason": "invalid_encoding",
            "message": "not UTF-8",
            "quarantined_at": NOW,
        }
        assert list(layout.incoming.iterdir()) == []

    def test_each_call_gets_its_own_file(self, layout: SpoolLayout) -> None:
        first = quarantine_bytes(layout, "hydra", b"1", "invalid_json", "m", NOW)
        second = quarantine_bytes(layout, "hydra", b"2", "invalid_json", "m", NOW)
        assert first != second
        assert (first.read_bytes(), second.read_bytes()) == (b"1", b"2")
        assert len(list(layout.quarantine.glob("*.reason"))) == 2


# --------------------------------------------------------------------------- trust of a path


class TestUnsafeDirectory:
    def test_root_only_path_is_safe(self, tmp_path: Path) -> None:
        target = tmp_path / "a" / "b"
        target.mkdir(parents=True)
        assert unsafe_directory(target, {0, os.geteuid()}) is None

    def test_missing(self, tmp_path: Path) -> None:
        assert unsafe_directory(tmp_path / "nope", {0}) == f"{tmp_path / 'nope'} is missing"

    def test_writable_by_the_group(self, tmp_path: Path) -> None:
        target = tmp_path / "t"
        target.mkdir()
        os.chmod(target, 0o770)
        assert unsafe_directory(target, {0, os.geteuid()}) == f"{target} is writable by group"

    def test_sticky_ancestor_passes_but_not_as_the_directory_itself(self) -> None:
        # /tmp: root's, 1777. Its root-owned children are safe; /tmp itself is not.
        base = Path(tempfile.mkdtemp(dir="/tmp"))
        try:
            assert unsafe_directory(base, {0, os.geteuid()}) is None
            assert unsafe_directory(Path("/tmp"), {0}) == "/tmp is writable by group and others"
            assert unsafe_directory(Path("/tmp"), {0}, ancestor=True) is None
        finally:
            base.rmdir()

    def test_ancestor_writable_without_sticky_bit(self, tmp_path: Path) -> None:
        parent = tmp_path / "p"
        (parent / "hook").mkdir(parents=True)
        os.chmod(parent, 0o777)
        problem = unsafe_directory(parent / "hook", {0, os.geteuid()})
        assert problem == f"{parent} is writable by group or others without the sticky bit"

    def test_owned_by_someone_untrusted(self, tmp_path: Path) -> None:
        target = tmp_path / "t"
        target.mkdir()
        if os.geteuid() != 0:
            pytest.skip("needs chown")
        os.chown(target, 65534, 65534)
        assert unsafe_directory(target, {0}) == f"{target} is owned by nobody (uid 65534)"
        assert unsafe_directory(target, {0, 65534}) is None

    def test_symbolic_links_are_checked_then_followed(self, tmp_path: Path) -> None:
        real = tmp_path / "real"
        real.mkdir()
        link = tmp_path / "link"
        link.symlink_to(real)
        assert unsafe_directory(link, {0, os.geteuid()}) is None
        os.chmod(real, 0o777)
        problem = unsafe_directory(link, {0, os.geteuid()})
        assert problem == f"{real} is writable by group and others"
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o700)
        os.chmod(loose, 0o777)
        (loose / "d").mkdir()
        hop = tmp_path / "hop"
        hop.symlink_to(loose / "d")
        assert "without the sticky bit" in (unsafe_directory(hop, {0, os.geteuid()}) or "")


class TestWriteHookEvent:
    def test_writes_one_complete_line_into_the_hook_directory(self, layout: SpoolLayout) -> None:
        path = write_hook_event(layout, hook_envelope(DRV, OUT, NOW))
        assert path.parent == layout.hook and is_candidate(path.name)
        data = path.read_bytes()
        assert data.endswith(b"\n") and data.count(b"\n") == 1
        event = parse_spool_document(decode_json(data), fallback_time=0.0)
        assert (event.source, event.drv_path, event.out_paths) == ("hook", DRV, (OUT,))
        assert mode(path) & 0o027 == 0
        assert list(layout.incoming.iterdir()) == []

    def test_refuses_a_directory_others_could_redirect(self, layout: SpoolLayout) -> None:
        os.chmod(layout.hook, 0o777)
        with pytest.raises(SpoolUnavailable, match=r"not safe to write: .* writable by group"):
            write_hook_event(layout, hook_envelope(DRV, OUT, NOW))
        assert list(layout.hook.iterdir()) == []

    def test_refuses_a_link_in_place_of_the_directory(
        self, layout: SpoolLayout, tmp_path: Path
    ) -> None:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        layout.hook.rmdir()
        layout.hook.symlink_to(elsewhere)
        with pytest.raises(SpoolUnavailable):
            write_hook_event(layout, hook_envelope(DRV, OUT, NOW))
        assert list(elsewhere.iterdir()) == []

    def test_missing_directory(self, tmp_path: Path) -> None:
        with pytest.raises(SpoolUnavailable, match="is missing"):
            write_hook_event(SpoolLayout(tmp_path / "none"), hook_envelope(DRV, OUT, NOW))

    def test_too_large(self, layout: SpoolLayout) -> None:
        with pytest.raises(EventRejected) as info:
            write_hook_event(layout, hook_envelope(DRV, OUT, NOW), max_bytes=50)
        assert info.value.reason == "too_large"


def test_the_hook_channel_is_the_hook_directory_unless_it_is_incoming(tmp_path: Path) -> None:
    spool = SpoolLayout(tmp_path)
    assert spool.in_hook_channel(spool.hook / "1.json")
    assert not spool.in_hook_channel(spool.incoming / "1.json")
    same = SpoolLayout(tmp_path, tmp_path / "incoming")
    assert not same.in_hook_channel(same.incoming / "1.json")
