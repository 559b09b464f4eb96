"""bridge/producers.py: what `enqueue-hydra` does with a payload, on a real spool."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bridge.events import parse_spool_document
from bridge.producers import PayloadRejected, record_hydra_payload
from bridge.spool import SpoolLayout, SpoolUnavailable
from tests.nixhelpers import Built, hydra_payload

NOW = 1_764_030_000.5
BUILT = Built(
    "hello",
    "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-hello.drv",
    "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello",
)
LIMIT = 64 * 1024


@pytest.fixture
def layout(tmp_path: Path) -> SpoolLayout:
    spool = SpoolLayout(tmp_path / "spool")
    spool.ensure()
    return spool


def payload_bytes(**changes: object) -> bytes:
    return json.dumps(hydra_payload(7, BUILT) | changes).encode()


def quarantined(layout: SpoolLayout) -> dict[str, tuple[bytes, dict[str, object]]]:
    """name -> (content, .reason record) of every file in quarantine/."""
    found = {}
    for name in os.listdir(layout.quarantine):
        if not name.endswith(".reason"):
            reason = json.loads((layout.quarantine / f"{name}.reason").read_text())
            found[name] = ((layout.quarantine / name).read_bytes(), reason)
    return found


def test_valid_payload_is_written_into_incoming_as_a_hydra_envelope(layout: SpoolLayout) -> None:
    event, target = record_hydra_payload(layout, payload_bytes(), LIMIT, NOW)
    assert target.parent == layout.incoming
    assert os.listdir(layout.incoming) == [target.name]
    assert os.listdir(layout.tmp) == [] and quarantined(layout) == {}
    assert (event.source, event.build_id, event.drv_path) == ("hydra", 7, BUILT.drv)
    assert event.out_paths == (BUILT.out,)
    assert (event.project, event.jobset, event.job) == ("proj", "main", "pkg.x86_64-linux")
    document = json.loads(target.read_bytes())
    assert document["kind"] == "hydra" and document["received_at"] == NOW
    assert document["payload"] == json.loads(payload_bytes())
    # The daemon reads back the same event.
    assert parse_spool_document(document, 0.0) == event
    assert not os.stat(target).st_mode & 0o002


def test_each_payload_gets_its_own_file(layout: SpoolLayout) -> None:
    first = record_hydra_payload(layout, payload_bytes(), LIMIT, NOW)[1]
    second = record_hydra_payload(layout, payload_bytes(), LIMIT, NOW)[1]
    assert first != second
    assert sorted(os.listdir(layout.incoming)) == sorted([first.name, second.name])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{", "invalid_json"),
        (b"\xff\xfe", "invalid_encoding"),
        (b"[]", "invalid_event"),
        (payload_bytes(drvPath="/nix/store/not-a-store-path.drv"), "invalid_store_path"),
        (payload_bytes(build="7"), "invalid_event"),
    ],
)
def test_invalid_payload_is_saved_verbatim_in_quarantine(
    layout: SpoolLayout, data: bytes, reason: str
) -> None:
    with pytest.raises(PayloadRejected) as raised:
        record_hydra_payload(layout, data, LIMIT, NOW)
    rejected = raised.value
    assert rejected.reason == reason and rejected.save_error is None
    assert rejected.saved_as is not None and rejected.saved_as.parent == layout.quarantine
    assert os.listdir(layout.incoming) == [] and os.listdir(layout.tmp) == []
    [(content, record)] = quarantined(layout).values()
    assert content == data
    assert record["reason"] == reason
    assert str(rejected).startswith(f"invalid Hydra payload ({reason}): ")
    assert str(rejected).endswith(f"; saved as {rejected.saved_as}")


def test_payload_over_the_limit_is_rejected_as_too_large(layout: SpoolLayout) -> None:
    data = payload_bytes()
    with pytest.raises(PayloadRejected) as raised:
        record_hydra_payload(layout, data, len(data) - 1, NOW)
    assert raised.value.reason == "too_large"
    assert f"over {len(data) - 1} bytes" in raised.value.message
    assert os.listdir(layout.incoming) == []
    [(content, _)] = quarantined(layout).values()
    assert content == data


def test_limit_applies_to_the_spool_file_with_its_envelope(layout: SpoolLayout) -> None:
    """A payload just under the limit whose envelope takes it over: the daemon would find
    the file too large, so the producer rejects it already."""
    data = json.dumps(hydra_payload(7, BUILT), separators=(",", ":")).encode()
    with pytest.raises(PayloadRejected) as raised:
        record_hydra_payload(layout, data, len(data), NOW)
    assert raised.value.reason == "too_large"
    assert os.listdir(layout.incoming) == [] and os.listdir(layout.tmp) == []
    [(content, record)] = quarantined(layout).values()
    assert content == data and record["reason"] == "too_large"


def test_rejected_payload_that_cannot_be_saved_says_why(layout: SpoolLayout) -> None:
    shutil.rmtree(layout.quarantine)
    with pytest.raises(PayloadRejected) as raised:
        record_hydra_payload(layout, b"{", LIMIT, NOW)
    assert raised.value.saved_as is None
    assert raised.value.save_error == "No such file or directory"
    assert str(raised.value).endswith("; could not be saved: No such file or directory")


def test_valid_payload_without_a_spool_is_unavailable_not_rejected(tmp_path: Path) -> None:
    missing = SpoolLayout(tmp_path / "never-created")
    with pytest.raises(SpoolUnavailable, match="has the daemon run once"):
        record_hydra_payload(missing, payload_bytes(), LIMIT, NOW)
