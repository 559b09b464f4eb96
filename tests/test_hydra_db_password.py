"""[hydra_db] password_file against a real PostgreSQL 15 that requires scram-sha-256.

The session's server trusts its local socket; each test here adds its own role with a
password and a pg_hba.conf line (first match wins) requiring scram-sha-256 for that role on
that database only, so the other tests' trust logins are untouched.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from prometheus_client import generate_latest
from psycopg import sql

from bridge.clock import SystemClock
from bridge.config import Config, HydraDbSettings, parse_config
from bridge.hydradb import HydraReader, connect, to_event
from bridge.hydrasource import HydraDbSource
from bridge.hydrastate import HydraState, SourceStatus
from bridge.intake import Intake
from bridge.secrets import SecretError, secret_forms
from bridge.statedb import StateDb
from tests.integration.daemonproc import bridge
from tests.pghelpers import HydraDatabase, hydra_db, postgres_server
from tests.test_hydra_source import Harness, store_paths, wait_for

__all__ = ["hydra_db", "postgres_server"]  # fixtures

RULES = '[[rules]]\njobs = ["proj:*:*"]\ncaches = ["local"]\nsources = ["hydra-db", "backfill"]\n'


@dataclass(frozen=True)
class PasswordRole:
    """A login role that must authenticate with scram-sha-256, and its password."""

    name: str
    password: str
    dsn: str


@pytest.fixture
def scram_role(hydra_db: HydraDatabase, monkeypatch: pytest.MonkeyPatch) -> Iterator[PasswordRole]:
    """A read-only role like the bridge's, with a password PostgreSQL demands over scram."""
    # libpq must not find a password anywhere but in what the bridge passes it.
    for name in ("PGPASSWORD", "PGSERVICE", "PGSERVICEFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent/pgpass")
    server = hydra_db.server
    role = f"hcb_pw_{hydra_db.name}"
    # Quotes, a backslash, a space and '=' exercise conninfo quoting; the tail makes it unique.
    password = f"s3 cr'et\\=pw-{secrets.token_hex(8)}"
    with hydra_db.connect() as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(hydra_db.name), sql.Identifier(role)
            )
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL(
                "GRANT SELECT ON builds, jobsets, buildoutputs, jobsetevals, jobsetevalmembers"
                " TO {}"
            ).format(sql.Identifier(role))
        )
        stored = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)
        ).fetchone()
    assert stored is not None and str(stored[0]).startswith("SCRAM-SHA-256$")
    hba = server.data / "pg_hba.conf"
    original = hba.read_text()
    # Written in place (as root): the file keeps its owner, the server's user.
    hba.write_text(f"local {hydra_db.name} {role} scram-sha-256\n{original}")
    dsn = server.dsn(hydra_db.name, role)
    try:
        with server.admin() as conn:
            conn.execute("SELECT pg_reload_conf()")
            errors = conn.execute(
                "SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL"
            ).fetchall()
        assert errors == []
        wait_for(lambda: _refused_without_password(dsn), "pg_hba.conf to require a password")
        yield PasswordRole(role, password, dsn)
    finally:
        hba.write_text(original)
        with server.admin() as conn:
            conn.execute("SELECT pg_reload_conf()")


def _refused_without_password(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        assert "no password supplied" in str(exc), exc
        return True
    return False


def _settings(dsn: str, password_file: Path) -> HydraDbSettings:
    return HydraDbSettings(dsn=dsn, password_file=password_file, connect_timeout_seconds=5)


def _config_text(tmp_path: Path, role: PasswordRole, password_file: Path) -> str:
    return (
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[caches.local]\nbackend = "nix-copy"\nuri = "file://{tmp_path / "cache"}"\n{RULES}'
        f'[hydra_db]\ndsn = "{role.dsn}"\npassword_file = "{password_file}"\n'
    )


def _config(tmp_path: Path, role: PasswordRole, password_file: Path) -> Config:
    return parse_config(tomllib.loads(_config_text(tmp_path, role, password_file)), "test.toml")


def _assert_no_secret(text: str, *passwords: str) -> None:
    for password in passwords:
        for form in secret_forms(password):
            assert form not in text, f"a form of the password leaked: {text!r}"


def _finished_build(db: HydraDatabase, n: int = 1) -> tuple[int, str]:
    jobset = db.jobset("proj", "main")
    drv, out = store_paths(n)
    build_id = db.queue_build(jobset, "hello.x86_64-linux", drv, [("out", out)])
    db.add_eval(jobset, [build_id])
    db.finish_build(build_id, notify=False)
    return build_id, out


def _source_status(harness: Harness) -> SourceStatus | None:
    reader = StateDb(harness.config.database_path, create=False)
    try:
        return HydraState(reader.conn).status()
    finally:
        reader.close()


def test_password_file_authenticates_with_scram_and_reads_a_finished_build(
    tmp_path: Path, hydra_db: HydraDatabase, scram_role: PasswordRole
) -> None:
    build_id, out = _finished_build(hydra_db)
    password_file = tmp_path / "hydra-db-password"
    password_file.write_text(scram_role.password + "\n")  # a trailing newline, as echo writes

    with connect(_settings(scram_role.dsn, password_file)) as conn:
        user = conn.execute("SELECT current_user").fetchone()
        reader = HydraReader(conn)
        (row,) = reader.builds([build_id])
        outputs = reader.outputs([build_id])[build_id]
    assert user == (scram_role.name,)
    event = to_event(row, outputs, "hydra-db", time.time())
    assert (event.build_id, event.project, event.jobset, event.out_paths) == (
        build_id,
        "proj",
        "main",
        (out,),
    )

    # The CLI's backfill path connects the same way.
    config = tmp_path / "bridge.toml"
    config.write_text(_config_text(tmp_path, scram_role, password_file))
    dry = bridge(
        "backfill", "--config", str(config), "--jobset", "proj:main", "--latest", "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "1 finished build(s); would record 1" in dry.stdout
    _assert_no_secret(dry.stdout + dry.stderr, scram_role.password)

    # The running source: connects, catches up, records the build as an event.
    harness = Harness(_config(tmp_path, scram_role, password_file))
    try:
        harness.start()
        events = wait_for(harness.events, "the build recorded")
        assert [(e[0], e[1]) for e in events] == [("hydra-db", build_id)]
    finally:
        harness.halt()
        harness.queue.close()


def test_wrong_password_fails_clearly_and_never_shows_a_password(
    tmp_path: Path,
    hydra_db: HydraDatabase,
    scram_role: PasswordRole,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # psycopg's and the bridge's loggers, every level
    wrong = f"wrong'pass word-{secrets.token_hex(8)}"
    password_file = tmp_path / "hydra-db-password"
    password_file.write_text(wrong)

    with pytest.raises(psycopg.OperationalError) as caught:
        connect(_settings(scram_role.dsn, password_file))
    text = f"{caught.value}\n{caught.value!r}\n{caught.value.args!r}"
    assert f'password authentication failed for user "{scram_role.name}"' in str(caught.value)
    _assert_no_secret(text, wrong, scram_role.password)

    # The running source: disconnected, the reason in `status`, never the password.
    harness = Harness(_config(tmp_path, scram_role, password_file))
    source = HydraDbSource(
        harness.config,
        harness.queue,
        Intake(harness.config.rules, harness.metrics, SystemClock()),
        harness.db_metrics,
        SystemClock(),
        stop=harness.stop,
    )
    harness.thread = threading.Thread(target=source.run, daemon=True)
    harness.thread.start()
    try:
        status = wait_for(
            lambda: (s := _source_status(harness)) is not None and s.last_error and s, "an error"
        )
        assert status.state == "disconnected"
        assert "password authentication failed" in (status.last_error or "")
        assert harness.value("hydra_db_connected") == 0
    finally:
        harness.halt()
        harness.queue.close()
    _assert_no_secret(repr(status), wrong, scram_role.password)
    _assert_no_secret(generate_latest(harness.registry).decode(), wrong, scram_role.password)

    config_file = tmp_path / "bridge.toml"
    config_file.write_text(_config_text(tmp_path, scram_role, password_file))
    failed = bridge(
        "backfill", "--config", str(config_file), "--jobset", "proj:main", "--latest", "--dry-run"
    )
    assert failed.returncode != 0
    assert "cannot connect to Hydra's database" in failed.stderr
    assert "password authentication failed" in failed.stderr
    status_out = bridge("status", "--config", str(config_file))
    assert "password authentication failed" in status_out.stdout, status_out
    _assert_no_secret(
        failed.stdout + failed.stderr + status_out.stdout + status_out.stderr,
        wrong,
        scram_role.password,
    )
    _assert_no_secret(caplog.text, wrong, scram_role.password)
    assert "password authentication failed" in caplog.text  # the source logged the reason


def test_missing_password_file_names_the_file(
    tmp_path: Path,
    hydra_db: HydraDatabase,
    scram_role: PasswordRole,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    missing = tmp_path / "no-such-password"

    with pytest.raises(SecretError) as caught:
        connect(_settings(scram_role.dsn, missing))
    assert str(caught.value) == f"cannot read secret file {missing}: No such file or directory"

    config_file = tmp_path / "bridge.toml"
    config_file.write_text(_config_text(tmp_path, scram_role, missing))
    failed = bridge(
        "backfill", "--config", str(config_file), "--jobset", "proj:main", "--latest", "--dry-run"
    )
    assert failed.returncode != 0
    assert f"cannot read secret file {missing}: No such file or directory" in failed.stderr
    _assert_no_secret(failed.stdout + failed.stderr + caplog.text, scram_role.password)
