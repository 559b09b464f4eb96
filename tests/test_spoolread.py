"""bridge/spoolread.py: one spool file → an event or a verdict, with nothing moved."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bridge.events import hook_envelope
from bridge.spool import SpoolLayout
from bridge.spoolread import Channels, SpoolReader, Verdict
from bridge.store import StoreQueryError

DRV = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12.drv"
OUT = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12"


class Store:
    """The store's answers, fixed by the test (NixStore's interface for outputs)."""

    def __init__(self, outputs: list[str] | None) -> None:
        self.outputs = outputs
        self.asked: list[str] = []

    def resolve_outputs(self, drv_path: str) -> list[str]:
        self.asked.append(drv_path)
        if self.outputs is None:
            raise StoreQueryError("no such derivation")
        return self.outputs


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.ensure()
    return spool


def channels(layout: SpoolLayout, *, private: bool = True) -> Channels:
    return Channels(layout, hook_trusted=True, incoming_private=private, hook_seen={})


def reader(store: Store, seen: bool = False) -> SpoolReader:
    return SpoolReader(store, 1 << 20, time.time, lambda name, digest: seen)


def write(path: Path, document: object, *, newline: bool = False) -> Path:
    path.write_text(json.dumps(document) + ("\n" if newline else ""))
    return path


def test_a_hook_line_with_only_drv_path_gets_its_outputs_from_the_store(
    layout: SpoolLayout,
) -> None:
    store = Store([OUT])
    path = write(layout.hook / "1.json", hook_envelope(DRV, "", 1.0), newline=True)
    read = reader(store).read(path, channels(layout))
    assert read.verdict is Verdict.ACCEPT and read.event is not None
    assert read.event.out_paths == (OUT,) and store.asked == [DRV]
    info = os.lstat(path)
    assert read.identity == (info.st_ino, info.st_mtime_ns, info.st_size)
    assert path.exists()  # reading moves nothing


def test_a_hook_line_without_its_newline_settles_then_is_rejected(layout: SpoolLayout) -> None:
    path = write(layout.hook / "2.json", hook_envelope(DRV, OUT, 1.0))
    assert reader(Store([OUT])).read(path, channels(layout)).verdict is Verdict.DEFER
    os.utime(path, (time.time() - 60, time.time() - 60))
    read = reader(Store([OUT])).read(path, channels(layout))
    assert (read.verdict, read.reason) == (Verdict.REJECT, "incomplete_event")
    assert read.data == path.read_bytes()  # copied into quarantine, the file stays


def test_a_hook_event_in_a_shared_incoming_directory_is_untrusted(layout: SpoolLayout) -> None:
    path = write(layout.incoming / "3.json", hook_envelope(DRV, OUT, 1.0))
    read = reader(Store([OUT])).read(path, channels(layout, private=False))
    assert (read.verdict, read.reason) == (Verdict.REJECT, "untrusted_channel")
    ok = reader(Store([OUT])).read(path, channels(layout, private=True))
    assert ok.verdict is Verdict.ACCEPT and ok.identity is None


def test_unresolvable_outputs_and_recorded_files(layout: SpoolLayout) -> None:
    path = write(layout.incoming / "4.json", hook_envelope(DRV, "", 1.0))
    read = reader(Store(None)).read(path, channels(layout))
    assert (read.verdict, read.reason, read.message) == (
        Verdict.REJECT,
        "unresolved_outputs",
        "no such derivation",
    )
    assert reader(Store([OUT]), seen=True).read(path, channels(layout)).verdict is Verdict.DUPLICATE


def test_a_young_incomplete_file_waits_unless_its_writer_closed_it(layout: SpoolLayout) -> None:
    path = layout.incoming / "5.json"
    path.write_text('{"version": 1, ')
    assert reader(Store([OUT])).read(path, channels(layout)).verdict is Verdict.DEFER
    closed = reader(Store([OUT])).read(path, channels(layout), writer_closed=True)
    assert (closed.verdict, closed.reason) == (Verdict.REJECT, "invalid_json")


def test_gone_and_untrusted_hook_files_are_nothing(layout: SpoolLayout) -> None:
    gone = reader(Store([OUT])).read(layout.incoming / "gone.json", channels(layout))
    assert gone.verdict is Verdict.NOTHING
    path = write(layout.hook / "6.json", hook_envelope(DRV, OUT, 1.0), newline=True)
    untrusted = Channels(layout, hook_trusted=False, incoming_private=True, hook_seen={})
    assert reader(Store([OUT])).read(path, untrusted).verdict is Verdict.NOTHING


def test_a_hook_directory_that_is_incoming_itself_is_read_as_incoming(
    layout: SpoolLayout,
) -> None:
    # [spool] hook_dir may name incoming/: its files are then incoming's, and an unsafe
    # "hook directory" (the shared incoming/) must not hide them.
    path = write(layout.incoming / "7.json", hook_envelope(DRV, OUT, 1.0))
    same = Channels(
        SpoolLayout(layout.root, layout.incoming),
        hook_trusted=False,
        incoming_private=True,
        hook_seen={},
    )
    read = reader(Store([OUT])).read(path, same)
    assert read.verdict is Verdict.ACCEPT and read.identity is None
