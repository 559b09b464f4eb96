"""A throw-away PostgreSQL 15 server with Hydra's tables, and a stand-in for Hydra's writes.

The server runs as `nobody` (initdb refuses root) from a temporary directory, listening only
on a Unix socket there. Each test gets its own database; the bridge connects as the role
created by contrib/hydra-db/hydra-cachix-bridge-role.sql, so the grants are tested too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REPO = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).parent / "hydra_schema.sql"
ROLE_SQL = REPO / "contrib" / "hydra-db" / "hydra-cachix-bridge-role.sql"
BRIDGE_ROLE = "hydra-cachix-bridge"
_databases = itertools.count(1)


class PostgresServer:
    """initdb + pg_ctl in a temporary directory, as an unprivileged user."""

    def __init__(self, user: str = "nobody") -> None:
        if not (PG_BIN / "initdb").is_file():
            pytest.fail("PostgreSQL 15 is not installed: run the README's test setup")
        self.user = pwd.getpwnam(user)
        # A short path: a Unix socket path must stay under 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="hcb-pg-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "server.log"
        for path in (self.data, self.socket_dir):
            path.mkdir(mode=0o700)
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        os.chmod(self.socket_dir, 0o755)
        self.log.touch()
        os.chown(self.log, self.user.pw_uid, self.user.pw_gid)
        self._as_user(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        )

    def _as_user(self, args: Sequence[str], timeout: float = 60) -> None:
        done = subprocess.run(
            list(args),
            user=self.user.pw_uid,
            group=self.user.pw_gid,
            extra_groups=[],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr}\n{self.log.read_text()[-2000:]}")

    def _pg_ctl(self, *args: str) -> None:
        options = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off"
        self._as_user(
            [
                str(PG_BIN / "pg_ctl"),
                *("-D", str(self.data), "-l", str(self.log), "-o", options, "-w"),
                *args,
            ]
        )

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """Stop (fast: disconnect every client)."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self) -> None:
        """Stop and start again (every client connection is dropped)."""
        self._pg_ctl("restart", "-m", "fast")

    def dsn(self, dbname: str, user: str = "postgres") -> str:
        """libpq conninfo for a database on this server's socket."""
        return f"dbname={dbname} host={self.socket_dir} user={user}"

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        """A superuser autocommit connection."""
        return psycopg.connect(self.dsn(dbname), autocommit=True)

    def create_hydra_database(self) -> HydraDatabase:
        """A new database with Hydra's tables and the bridge's read-only role granted."""
        name = f"hydra{next(_databases)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        with self.admin(name) as conn:
            conn.execute(SCHEMA.read_text())
            conn.execute(ROLE_SQL.read_text())
        return HydraDatabase(self, name)

    def destroy(self) -> None:
        """Stop the server and remove its directory."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class HydraDatabase:
    """One Hydra database; writes what Hydra's evaluator and queue runner would write."""

    server: PostgresServer
    name: str

    @property
    def bridge_dsn(self) -> str:
        """The conninfo the bridge uses (its own read-only role)."""
        return self.server.dsn(self.name, BRIDGE_ROLE)

    def connect(self) -> psycopg.Connection[Any]:
        """A superuser autocommit connection to this database (Hydra's side)."""
        return self.server.admin(self.name)

    def jobset(self, project: str = "proj", jobset: str = "main") -> int:
        """Create the project and jobset if needed; return the jobset id."""
        with self.connect() as conn:
            conn.execute(
                "INSERT INTO users (username, emailaddress, password) VALUES ('admin', '', '')"
                " ON CONFLICT DO NOTHING"
            )
            conn.execute(
                "INSERT INTO projects (name, displayname, owner) VALUES (%s, %s, 'admin')"
                " ON CONFLICT DO NOTHING",
                (project, project),
            )
            row = conn.execute(
                "INSERT INTO jobsets (name, project, emailoverride, type, flake)"
                " VALUES (%s, %s, '', 1, 'github:example/example')"
                " ON CONFLICT (project, name) DO UPDATE SET name = excluded.name RETURNING id",
                (jobset, project),
            ).fetchone()
            assert row is not None
            return int(row[0])

    def queue_build(
        self,
        jobset_id: int,
        job: str,
        drv_path: str,
        outputs: Sequence[tuple[str, str | None]],
        *,
        timestamp: int | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> int:
        """What the evaluator does: an unfinished build and its outputs; returns its id."""
        own = conn is None
        conn = conn or self.connect()
        try:
            row = conn.execute(
                "INSERT INTO builds (finished, timestamp, jobset_id, job, drvpath, system)"
                " VALUES (0, %s, %s, %s, %s, 'x86_64-linux') RETURNING id",
                (timestamp or int(time.time()), jobset_id, job, drv_path),
            ).fetchone()
            assert row is not None
            build_id = int(row[0])
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO buildoutputs (build, name, path) VALUES (%s, %s, %s)",
                    [(build_id, name, path) for name, path in outputs],
                )
            return build_id
        finally:
            if own:
                conn.close()

    def finish_build(
        self,
        build_id: int,
        *,
        status: int = 0,
        stoptime: int | None = None,
        notify: bool = True,
        dependents: Sequence[int] = (),
        conn: psycopg.Connection[Any] | None = None,
    ) -> None:
        """What the queue runner does: mark finished, commit, then NOTIFY (its own
        transaction), splitting long dependents lists as notify_build_finished does."""
        own = conn is None
        conn = conn or self.connect()
        try:
            stop = stoptime or int(time.time())
            conn.execute(
                "UPDATE builds SET finished = 1, buildstatus = %s, starttime = %s,"
                " stoptime = %s, iscachedbuild = 0 WHERE id = %s",
                (status, stop - 1, stop, build_id),
            )
            if notify:
                for payload in notification_payloads(build_id, dependents):
                    conn.execute("SELECT pg_notify('build_finished', %s)", (payload,))
        finally:
            if own:
                conn.close()

    def add_eval(self, jobset_id: int, builds: Sequence[int]) -> int:
        """An evaluation with these member builds; returns its id."""
        with self.connect() as conn:
            row = conn.execute(
                "INSERT INTO jobsetevals (jobset_id, timestamp, checkouttime, evaltime,"
                " hasnewbuilds, hash) VALUES (%s, %s, 0, 1, 1, md5(random()::text)) RETURNING id",
                (jobset_id, int(time.time())),
            ).fetchone()
            assert row is not None
            eval_id = int(row[0])
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO jobsetevalmembers (eval, build, isnew) VALUES (%s, %s, 1)",
                    [(eval_id, build) for build in builds],
                )
            return eval_id

    def terminate_bridge_connections(self) -> int:
        """pg_terminate_backend every connection of the bridge's role; returns how many."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (BRIDGE_ROLE,),
            ).fetchall()
        return len(rows)

    def bridge_connections(self) -> int:
        """How many connections the bridge's role has open."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (BRIDGE_ROLE,)
            ).fetchone()
        return 0 if row is None else int(row[0])


def notification_payloads(build_id: int, dependents: Sequence[int], limit: int = 7000) -> list[str]:
    """Payloads as Hydra's queue runner sends them: the id, then dependents, each chunk under
    `limit` bytes and starting with the build id again (crates/db notify_build_finished)."""
    head = str(build_id)
    payloads: list[str] = []
    payload = head
    for dep in dependents:
        text = str(dep)
        if len(payload) + 1 + len(text) > limit:
            payloads.append(payload)
            payload = head
        payload += "\t" + text
    payloads.append(payload)
    return payloads


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL 15 server per test session (per xdist worker)."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def hydra_db(postgres_server: PostgresServer) -> HydraDatabase:
    """A fresh Hydra database for one test."""
    return postgres_server.create_hydra_database()
