"""[hydra_db] in the config, the new sources in rules, and their rendering."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bridge.config import Config, ConfigError, HydraDbSettings, parse_config
from bridge.events import Event
from bridge.hydrastate import SourceStatus
from bridge.matching import match_event
from bridge.render import hydra_db_document, mask_conninfo, render_config, render_hydra_db

CACHE = '[caches.local]\nbackend = "nix-copy"\nuri = "file:///tmp/c"\n'


def parse(text: str) -> Config:
    return parse_config(tomllib.loads(CACHE + text), "bridge.toml", base=Path("/etc/hcb"))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value.problems


def test_hydra_db_section_is_optional_and_validated() -> None:
    config = parse("")
    assert config.hydra_db is None
    config = parse(
        '[hydra_db]\ndsn = "dbname=hydra host=/run/postgresql user=hydra-cachix-bridge"\n'
        'password_file = "hydra-db-password"\noverlap_seconds = 600\npoll_seconds = 30\n'
    )
    assert config.hydra_db == HydraDbSettings(
        dsn="dbname=hydra host=/run/postgresql user=hydra-cachix-bridge",
        password_file=Path("hydra-db-password"),  # a systemd credential name
        overlap_seconds=600.0,
        poll_seconds=30.0,
    )
    assert problems("[hydra_db]\n") == [
        'bridge.toml:hydra_db.dsn: is required: a libpq connection string, e.g. "dbname=hydra"'
    ]
    assert problems('[hydra_db]\ndsn = "dbname=hydra"\npasword_file = "x"\n') == [
        "bridge.toml:hydra_db.pasword_file: unknown key"
    ]
    assert problems('[hydra_db]\ndsn = "x"\npoll_seconds = 0\n') == [
        "bridge.toml:hydra_db.poll_seconds: must be at least 1"
    ]


def test_runcommand_rules_apply_to_database_and_backfill_events() -> None:
    config = parse('[[rules]]\njobs = ["proj:main:*"]\ncaches = ["local"]\nbuild_statuses = [0]\n')
    rules = config.rules
    for source in ("hydra", "hydra-db", "backfill"):
        ok = Event(source, 0.0, ("/nix/store/" + "a" * 32 + "-x",), None, 1, "proj", "main", "j", 0)
        failed = Event(source, 0.0, ok.out_paths, None, 2, "proj", "main", "j", 1)
        assert match_event(ok, rules).targets, source
        assert match_event(failed, rules).ignored_reason == "status_filtered", source
    only_db = parse('[[rules]]\njobs = ["proj:*:*"]\ncaches = ["local"]\nsources = ["hydra-db"]\n')
    assert only_db.rules[0].sources == ("hydra-db",)
    assert problems('[[rules]]\njobs = ["p:*:*"]\ncaches = ["local"]\nsources = ["hook"]\n') == [
        "bridge.toml:rules[0].jobs: job patterns only match Hydra events, but sources has "
        "none of hydra, hydra-db, backfill"
    ]


def test_passwords_never_rendered() -> None:
    assert (
        mask_conninfo("dbname=hydra password=s3cret user=x") == "dbname=hydra password=*** user=x"
    )
    assert mask_conninfo("password = 'a b\\' c' host=h") == "password = *** host=h"
    assert "s3cret" not in mask_conninfo("postgresql://u:s3cret@db.example/hydra")
    config = parse('[hydra_db]\ndsn = "dbname=hydra password=s3cret"\n')
    text = render_config(config)
    assert "[hydra_db]" in text and "s3cret" not in text and "password=***" in text


def test_status_rendering() -> None:
    status = SourceStatus(
        "listening", 100.0, "OperationalError: gone", 1_700_000_000, 42, 1_700_000_050, 160.0
    )
    text = render_hydra_db(status, 1_700_000_100.0, True)
    assert text.startswith("hydra database source: listening since")
    assert "(build 42)" in text and "last error" not in text
    assert "not running (last: listening)" in render_hydra_db(status, 200.0, False)
    down = SourceStatus("disconnected", 100.0, "OperationalError: gone", None, None, None, 160.0)
    assert "last error: OperationalError: gone" in render_hydra_db(down, 200.0, True)
    document = hydra_db_document(status, 1_700_000_100.0)
    assert document is not None and document["lag_seconds"] == 50.0
    assert hydra_db_document(None, 0.0) == {"state": "never ran", "checkpoint_stoptime": None}
