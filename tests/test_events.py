"""Unit tests for bridge.events: JSON decoding, Hydra payloads, hook fields, spool envelopes."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from bridge.events import (
    MAX_NAME_LENGTH,
    MAX_OUTPUTS,
    SPOOL_FORMAT_VERSION,
    Event,
    EventRejected,
    decode_json,
    hook_envelope,
    hydra_envelope,
    parse_hook_fields,
    parse_hydra_payload,
    parse_spool_document,
)
from exporter.vocabulary import RejectReason
from tests.nixhelpers import Built, hydra_payload

HASH_A = "0123456789abcdfghijklmnpqrsvwxyz"
HASH_B = "zyxwvsrqpnmlkjihgfdcba9876543210"
HASH_C = "00000000000000000000000000000000"
DRV = f"/nix/store/{HASH_A}-hello-2.12.1.drv"
OUT = f"/nix/store/{HASH_B}-hello-2.12.1"
DEV = f"/nix/store/{HASH_C}-hello-2.12.1-dev"
NOW = 1_700_000_100.5


def payload(**changes: Any) -> dict[str, Any]:
    """A full buildFinished payload (REFERENCE.md §1) with some fields replaced."""
    doc = hydra_payload(17, Built("hello-2.12.1", DRV, OUT))
    doc.update(changes)
    return doc


def without(key: str) -> dict[str, Any]:
    doc = payload()
    del doc[key]
    return doc


def rejected(func: Any, *args: Any) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        func(*args)
    assert info.value.reason in set(RejectReason)
    assert str(info.value) == info.value.message
    return info.value


# --------------------------------------------------------------------------- decode_json


class TestDecodeJson:
    def test_valid_object(self) -> None:
        assert decode_json(b'{"a": [1, 2.5, "\\u00e9", null, true]}') == {
            "a": [1, 2.5, "\u00e9", None, True]
        }

    def test_utf8_text_is_accepted(self) -> None:
        assert decode_json('{"k": "h\u00e9llo \u2603"}'.encode()) == {"k": "h\u00e9llo \u2603"}

    @pytest.mark.parametrize(
        "data", [b'{"a": "\xff"}', b"\xfe\xff", '{"a": "\u00e9"}'.encode("latin-1"), b"\xc3"]
    )
    def test_non_utf8_is_invalid_encoding(self, data: bytes) -> None:
        exc = rejected(decode_json, data)
        assert exc.reason == "invalid_encoding"
        assert "UTF-8" in exc.message

    def test_utf16_is_invalid_encoding(self) -> None:
        assert rejected(decode_json, '{"a": 1}'.encode("utf-16")).reason == "invalid_encoding"

    @pytest.mark.parametrize(
        "data", [b"NaN", b"Infinity", b"-Infinity", b'{"stopTime": NaN}', b"[1, Infinity]"]
    )
    def test_nan_and_infinity_constants_are_rejected(self, data: bytes) -> None:
        exc = rejected(decode_json, data)
        assert exc.reason == "invalid_json"
        assert "non-standard JSON constant" in exc.message

    @pytest.mark.parametrize("data", [b"1e400", b'{"metrics": [{"value": -1e999}]}'])
    def test_overflowing_numbers_are_rejected_like_infinity(self, data: bytes) -> None:
        # The docstring promises to reject Infinity; 1e400 decodes to inf in Python, and
        # json.dumps later writes it back as the non-standard `Infinity` token.
        exc = rejected(decode_json, data)
        assert exc.reason == "invalid_json"

    @pytest.mark.parametrize("data", [b"[" * 200_000, b'{"a":' * 200_000, b"[{" * 100_000])
    def test_deep_nesting_is_invalid_json_not_recursion_error(self, data: bytes) -> None:
        exc = rejected(decode_json, data)
        assert exc.reason == "invalid_json"

    def test_moderate_nesting_is_fine(self) -> None:
        value = decode_json(b"[" * 50 + b"]" * 50)
        for _ in range(49):
            value = value[0]
        assert value == []

    @pytest.mark.parametrize(
        "data",
        [b"", b"{", b"{'a': 1}", b'{"a": 1,}', b"nul", b'{"a" 1}', b"[1] [2]", b"1" * 5000],
    )
    def test_invalid_json(self, data: bytes) -> None:
        exc = rejected(decode_json, data)
        assert exc.reason == "invalid_json"
        assert exc.message.startswith("invalid JSON")


# --------------------------------------------------------------------------- Hydra payloads


class TestHydraPayloadValid:
    def test_full_payload(self) -> None:
        event = parse_hydra_payload(payload(), NOW)
        assert event == Event(
            source="hydra",
            received_at=NOW,
            out_paths=(OUT,),
            drv_path=DRV,
            build_id=17,
            project="proj",
            jobset="main",
            job="pkg.x86_64-linux",
            build_status=0,
            finished_at=1_700_000_020.0,
            skipped_outputs=0,
        )
        assert event.hydra_job == ("proj", "main", "pkg.x86_64-linux")
        assert not event.needs_output_resolution

    def test_minimal_payload_with_only_required_fields(self) -> None:
        doc = {
            "build": 1,
            "project": "p",
            "jobset": "j",
            "job": "hello.x86_64-linux",
            "drvPath": DRV,
            "buildStatus": 1,
            "outputs": [{"name": "out", "path": OUT}],
        }
        event = parse_hydra_payload(doc, NOW)
        assert event.build_status == 1
        assert event.finished_at is None
        assert event.out_paths == (OUT,)

    def test_payload_is_not_modified(self) -> None:
        doc = payload()
        before = copy.deepcopy(doc)
        parse_hydra_payload(doc, NOW)
        assert doc == before

    @pytest.mark.parametrize(
        "key", ["startTime", "stopTime", "timestamp", "nixName", "system", "homepage"]
    )
    def test_nullable_fields_accept_null(self, key: str) -> None:
        event = parse_hydra_payload(payload(**{key: None}), NOW)
        assert event.out_paths == (OUT,)

    @pytest.mark.parametrize("key", ["description", "license", "products", "metrics"])
    def test_more_nullable_fields_accept_null(self, key: str) -> None:
        assert parse_hydra_payload(payload(**{key: None}), NOW).build_id == 17

    def test_stop_time_null_gives_no_finished_at(self) -> None:
        assert parse_hydra_payload(payload(stopTime=None), NOW).finished_at is None

    def test_float_times_are_accepted(self) -> None:
        event = parse_hydra_payload(payload(stopTime=1_700_000_020.25), NOW)
        assert event.finished_at == 1_700_000_020.25

    @pytest.mark.parametrize(
        "key",
        [
            "event",
            "finished",
            "timestamp",
            "startTime",
            "stopTime",
            "nixName",
            "system",
            "homepage",
            "description",
            "license",
            "products",
            "metrics",
        ],
    )
    def test_optional_fields_may_be_missing(self, key: str) -> None:
        event = parse_hydra_payload(without(key), NOW)
        assert event.build_id == 17
        assert event.out_paths == (OUT,)

    def test_unknown_fields_are_ignored(self) -> None:
        doc = payload(newHydraField={"nested": [1, 2]}, anotherOne=None, chunk=3)
        assert parse_hydra_payload(doc, NOW) == parse_hydra_payload(payload(), NOW)

    @pytest.mark.parametrize("status", [None, 0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13])
    def test_every_build_status_is_carried(self, status: int | None) -> None:
        assert parse_hydra_payload(payload(buildStatus=status), NOW).build_status == status

    def test_null_output_paths_are_skipped_and_counted(self) -> None:
        outputs = [
            {"name": "out", "path": OUT},
            {"name": "dev", "path": None},
            {"name": "doc", "path": None},
        ]
        event = parse_hydra_payload(payload(outputs=outputs), NOW)
        assert event.out_paths == (OUT,)
        assert event.skipped_outputs == 2

    def test_all_outputs_null_gives_no_paths(self) -> None:
        event = parse_hydra_payload(payload(outputs=[{"name": "out", "path": None}]), NOW)
        assert event.out_paths == ()
        assert event.skipped_outputs == 1

    def test_empty_outputs(self) -> None:
        event = parse_hydra_payload(payload(outputs=[]), NOW)
        assert event.out_paths == ()
        assert event.skipped_outputs == 0

    def test_duplicate_outputs_are_deduplicated_in_order(self) -> None:
        outputs = [
            {"name": "dev", "path": DEV},
            {"name": "out", "path": OUT},
            {"name": "out2", "path": DEV},
            {"name": "out3", "path": OUT},
        ]
        assert parse_hydra_payload(payload(outputs=outputs), NOW).out_paths == (DEV, OUT)

    def test_extra_keys_in_outputs_are_ignored(self) -> None:
        outputs = [{"name": "out", "path": OUT, "size": 5}]
        assert parse_hydra_payload(payload(outputs=outputs), NOW).out_paths == (OUT,)

    def test_max_outputs_is_accepted(self) -> None:
        outputs = [{"name": "out", "path": OUT}] * MAX_OUTPUTS
        assert parse_hydra_payload(payload(outputs=outputs), NOW).out_paths == (OUT,)

    def test_name_of_max_length_is_accepted(self) -> None:
        job = "j" * MAX_NAME_LENGTH
        assert parse_hydra_payload(payload(job=job), NOW).job == job


WRONG_TYPES: list[tuple[str, Any]] = [
    # field, wrong value
    ("event", 1),
    ("event", None),
    ("event", ["buildFinished"]),
    ("build", "17"),
    ("build", 17.0),
    ("build", None),
    ("build", True),
    ("build", [17]),
    ("finished", 1),
    ("finished", "true"),
    ("finished", None),
    ("timestamp", "1700000000"),
    ("timestamp", True),
    ("timestamp", {}),
    ("startTime", "10"),
    ("startTime", False),
    ("stopTime", "20"),
    ("stopTime", True),
    ("stopTime", [20]),
    ("project", 5),
    ("project", None),
    ("project", True),
    ("jobset", ["main"]),
    ("jobset", None),
    ("job", 1.5),
    ("job", None),
    ("drvPath", None),
    ("drvPath", 0),
    ("drvPath", [DRV]),
    ("buildStatus", "0"),
    ("buildStatus", 0.0),
    ("buildStatus", True),
    ("buildStatus", False),
    ("buildStatus", [0]),
    ("nixName", 3),
    ("system", ["x86_64-linux"]),
    ("homepage", True),
    ("description", 1),
    ("license", {"spdx": "MIT"}),
    ("products", {"productNr": 1}),
    ("products", "x"),
    ("products", [1, 2]),
    ("products", [None]),
    ("metrics", "closure-size"),
    ("metrics", [["closure-size", "bytes", 1]]),
    ("outputs", None),
    ("outputs", {"out": OUT}),
    ("outputs", OUT),
    ("outputs", [OUT]),
    ("outputs", [None]),
]


class TestHydraPayloadInvalid:
    @pytest.mark.parametrize(("key", "value"), WRONG_TYPES)
    def test_wrong_type_is_invalid_event_naming_the_field(self, key: str, value: Any) -> None:
        exc = rejected(parse_hydra_payload, payload(**{key: value}), NOW)
        assert exc.reason == "invalid_event"
        assert key in exc.message

    @pytest.mark.parametrize(
        "key", ["build", "project", "jobset", "job", "drvPath", "buildStatus", "outputs"]
    )
    def test_missing_required_field(self, key: str) -> None:
        exc = rejected(parse_hydra_payload, without(key), NOW)
        assert exc.reason == "invalid_event"
        assert f"missing field {key!r}" in exc.message

    @pytest.mark.parametrize("value", [[], "buildFinished", None, 17, True])
    def test_payload_must_be_an_object(self, value: Any) -> None:
        exc = rejected(parse_hydra_payload, value, NOW)
        assert exc.reason == "invalid_event"
        assert "JSON object" in exc.message

    @pytest.mark.parametrize("kind", ["buildStarted", "stepFinished", "", "BUILDFINISHED"])
    def test_unsupported_event_kind(self, kind: str) -> None:
        exc = rejected(parse_hydra_payload, payload(event=kind), NOW)
        assert exc.reason == "invalid_event"
        assert "unsupported event" in exc.message

    def test_unsupported_event_kind_is_truncated_in_message(self) -> None:
        exc = rejected(parse_hydra_payload, payload(event="x" * 10_000), NOW)
        assert len(exc.message) < 200

    @pytest.mark.parametrize("key", ["project", "jobset", "job"])
    @pytest.mark.parametrize(
        "value", ["", "a\nb", "a\x00", "tab\there", "del\x7f", "x" * (MAX_NAME_LENGTH + 1)]
    )
    def test_bad_names(self, key: str, value: str) -> None:
        exc = rejected(parse_hydra_payload, payload(**{key: value}), NOW)
        assert exc.reason == "invalid_event"
        assert key in exc.message

    @pytest.mark.parametrize("key", ["timestamp", "startTime", "stopTime"])
    @pytest.mark.parametrize("value", [-1, -0.5, math.inf, math.nan, -math.inf])
    def test_times_must_be_finite_and_non_negative(self, key: str, value: float) -> None:
        exc = rejected(parse_hydra_payload, payload(**{key: value}), NOW)
        assert exc.reason == "invalid_event"
        assert key in exc.message

    @pytest.mark.parametrize(
        "drv",
        [
            OUT,  # a store path, but not a derivation
            "/tmp/x.drv",
            f"/nix/store/{HASH_A}-x.drv/../../etc/passwd",
            f"/nix/store/{HASH_A}-$(touch x).drv",
            "",
            DRV + "\n",
        ],
    )
    def test_drv_path_must_be_a_derivation_store_path(self, drv: str) -> None:
        exc = rejected(parse_hydra_payload, payload(drvPath=drv), NOW)
        assert exc.reason == "invalid_store_path"
        assert "drvPath" in exc.message

    @pytest.mark.parametrize(
        "path",
        [
            "/etc/passwd",
            OUT + "/bin/hello",
            f"/nix/store/{HASH_B}-a b",
            "",
            f"/nix/store/{HASH_B}-x; rm -rf /",
            DRV.replace("/nix/store", "/gnu/store"),
        ],
    )
    def test_non_store_output_path_is_invalid_store_path(self, path: str) -> None:
        outputs = [{"name": "out", "path": OUT}, {"name": "bad", "path": path}]
        exc = rejected(parse_hydra_payload, payload(outputs=outputs), NOW)
        assert exc.reason == "invalid_store_path"
        assert "outputs[1]" in exc.message

    def test_output_path_of_wrong_type(self) -> None:
        exc = rejected(parse_hydra_payload, payload(outputs=[{"name": "out", "path": 5}]), NOW)
        assert exc.reason == "invalid_event"
        assert "outputs[0]" in exc.message and "path" in exc.message

    @pytest.mark.parametrize(
        "output",
        [{"path": OUT}, {"name": "out"}, {"name": None, "path": OUT}, {"name": 1, "path": OUT}],
    )
    def test_output_entry_needs_name_and_path(self, output: dict[str, Any]) -> None:
        exc = rejected(parse_hydra_payload, payload(outputs=[output]), NOW)
        assert exc.reason == "invalid_event"
        assert "outputs[0]" in exc.message

    def test_too_many_outputs(self) -> None:
        outputs = [{"name": "out", "path": OUT}] * (MAX_OUTPUTS + 1)
        exc = rejected(parse_hydra_payload, payload(outputs=outputs), NOW)
        assert exc.reason == "invalid_event"
        assert str(MAX_OUTPUTS) in exc.message


# --------------------------------------------------------------------------- hook fields


class TestHookFields:
    def test_drv_and_outputs(self) -> None:
        event = parse_hook_fields(DRV, f"{OUT} {DEV}", NOW)
        assert event == Event(source="hook", received_at=NOW, out_paths=(OUT, DEV), drv_path=DRV)
        assert event.hydra_job is None
        assert not event.needs_output_resolution

    def test_whitespace_is_tolerated_and_duplicates_dropped(self) -> None:
        event = parse_hook_fields(f"  {DRV}\n", f"\t{OUT}  {DEV}\n{OUT} ", NOW)
        assert event.drv_path == DRV
        assert event.out_paths == (OUT, DEV)

    def test_empty_out_paths_with_drv_needs_resolution(self) -> None:
        # Debian's Nix 2.8.0 passes an empty OUT_PATHS (REFERENCE.md §2).
        event = parse_hook_fields(DRV, "", NOW)
        assert event.out_paths == ()
        assert event.drv_path == DRV
        assert event.needs_output_resolution

    def test_blank_out_paths_with_drv_needs_resolution(self) -> None:
        assert parse_hook_fields(DRV, "   ", NOW).needs_output_resolution

    def test_outputs_without_drv(self) -> None:
        event = parse_hook_fields("", OUT, NOW)
        assert event.drv_path is None
        assert event.out_paths == (OUT,)
        assert not event.needs_output_resolution

    @pytest.mark.parametrize(("drv", "outs"), [("", ""), ("  ", " \n ")])
    def test_neither_set_is_rejected(self, drv: str, outs: str) -> None:
        exc = rejected(parse_hook_fields, drv, outs, NOW)
        assert exc.reason == "invalid_event"
        assert "neither" in exc.message

    @pytest.mark.parametrize("drv", [OUT, "/tmp/x.drv", 'x"y', f"{DRV} {DRV}"])
    def test_bad_drv(self, drv: str) -> None:
        assert rejected(parse_hook_fields, drv, OUT, NOW).reason == "invalid_store_path"

    @pytest.mark.parametrize(
        "outs", ["/etc/passwd", f"{OUT} /tmp/x", f"{OUT}/bin", "$(touch x)", f"{OUT};{DEV}"]
    )
    def test_bad_out_paths(self, outs: str) -> None:
        exc = rejected(parse_hook_fields, DRV, outs, NOW)
        assert exc.reason == "invalid_store_path"
        assert "OUT_PATHS" in exc.message

    @pytest.mark.parametrize(("drv", "outs"), [(None, OUT), (DRV, None), (1, ""), (DRV, [OUT])])
    def test_non_strings(self, drv: Any, outs: Any) -> None:
        assert rejected(parse_hook_fields, drv, outs, NOW).reason == "invalid_event"

    def test_too_many_outputs(self) -> None:
        many = " ".join(f"/nix/store/{HASH_A}-o{i}" for i in range(MAX_OUTPUTS + 1))
        exc = rejected(parse_hook_fields, DRV, many, NOW)
        assert exc.reason == "invalid_event"
        assert str(MAX_OUTPUTS) in exc.message


# --------------------------------------------------------------------------- spool documents


class TestSpoolDocument:
    def test_hydra_envelope_round_trip(self) -> None:
        doc = hydra_envelope(payload(), NOW)
        assert doc["version"] == SPOOL_FORMAT_VERSION == 1
        assert doc["kind"] == "hydra"
        decoded = decode_json(json.dumps(doc).encode())
        assert parse_spool_document(decoded, 0.0) == parse_hydra_payload(payload(), NOW)

    def test_hook_envelope_round_trip(self) -> None:
        doc = hook_envelope(DRV, f"{OUT} {DEV}", NOW)
        assert doc["kind"] == "hook"
        event = parse_spool_document(decode_json(json.dumps(doc).encode()), 0.0)
        assert event == parse_hook_fields(DRV, f"{OUT} {DEV}", NOW)

    def test_received_at_falls_back_when_missing(self) -> None:
        doc = {"version": 1, "kind": "hook", "drv_path": DRV, "out_paths": OUT}
        assert parse_spool_document(doc, 123.0).received_at == 123.0

    def test_received_at_falls_back_when_null(self) -> None:
        doc = hook_envelope(DRV, OUT, NOW)
        doc["received_at"] = None
        assert parse_spool_document(doc, 456.0).received_at == 456.0

    def test_received_at_from_document_wins(self) -> None:
        assert parse_spool_document(hook_envelope(DRV, OUT, 99), 456.0).received_at == 99.0

    @pytest.mark.parametrize("value", ["now", True, [1], -1, math.inf, math.nan])
    def test_bad_received_at(self, value: Any) -> None:
        doc = hook_envelope(DRV, OUT, NOW)
        doc["received_at"] = value
        exc = rejected(parse_spool_document, doc, NOW)
        assert exc.reason == "invalid_event"
        assert "received_at" in exc.message

    def test_hook_document_as_written_by_the_hook_script(self) -> None:
        # The sh hook writes no received_at and may leave out_paths empty.
        doc = decode_json(
            b'{"version":1,"kind":"hook","drv_path":"' + DRV.encode() + b'","out_paths":""}\n'
        )
        event = parse_spool_document(doc, 77.0)
        assert event.needs_output_resolution
        assert event.received_at == 77.0

    def test_hook_document_missing_fields_is_neither_set(self) -> None:
        exc = rejected(parse_spool_document, {"version": 1, "kind": "hook"}, NOW)
        assert exc.reason == "invalid_event"

    @pytest.mark.parametrize("version", [None, 0, 2, "1", True, 1.5, [1]])
    def test_unsupported_versions(self, version: Any) -> None:
        doc = hook_envelope(DRV, OUT, NOW)
        doc["version"] = version
        exc = rejected(parse_spool_document, doc, NOW)
        assert exc.reason == "invalid_event"
        assert "version" in exc.message

    def test_missing_version(self) -> None:
        doc = hook_envelope(DRV, OUT, NOW)
        del doc["version"]
        assert "version" in rejected(parse_spool_document, doc, NOW).message

    @pytest.mark.parametrize("kind", [None, "log", "HYDRA", "", 1, "x" * 1000])
    def test_unknown_kind(self, kind: Any) -> None:
        doc = hook_envelope(DRV, OUT, NOW)
        doc["kind"] = kind
        exc = rejected(parse_spool_document, doc, NOW)
        assert exc.reason == "invalid_event"
        assert "unknown kind" in exc.message
        assert len(exc.message) < 200

    @pytest.mark.parametrize("doc", [[], "x", None, 1])
    def test_document_must_be_an_object(self, doc: Any) -> None:
        assert "JSON object" in rejected(parse_spool_document, doc, NOW).message

    def test_hydra_document_without_payload(self) -> None:
        doc = {"version": 1, "kind": "hydra", "received_at": NOW}
        assert rejected(parse_spool_document, doc, NOW).reason == "invalid_event"

    def test_hydra_document_with_invalid_payload_keeps_reason(self) -> None:
        bad = payload(outputs=[{"name": "out", "path": "/etc/passwd"}])
        exc = rejected(parse_spool_document, hydra_envelope(bad, NOW), NOW)
        assert exc.reason == "invalid_store_path"

    def test_hook_document_with_bad_path_keeps_reason(self) -> None:
        exc = rejected(parse_spool_document, hook_envelope(DRV, "/etc/passwd", NOW), NOW)
        assert exc.reason == "invalid_store_path"
