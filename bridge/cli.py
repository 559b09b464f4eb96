"""Command line: parses options and wires objects; the work lives in the core modules."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from bridge.config import Config
    from bridge.hydrastate import SourceStatus
    from bridge.spooltarget import SpoolTarget
    from exporter.metrics import BridgeMetrics

CONFIG_HELP = "TOML config file (default: $HYDRA_CACHIX_BRIDGE_CONFIG, else embedded defaults)."
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=CONFIG_HELP,
)


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"hydra-cachix-bridge: {message}", err=True)
    sys.exit(code)


def _load(config_path: Path | None) -> Config:
    from bridge.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(1)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    # click.version_option would need the version when this module is imported.
    if not value or ctx.resilient_parsing:
        return
    from bridge import __version__

    click.echo(f"hydra-cachix-bridge, version {__version__}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
def main() -> None:
    """Push every Hydra build to Cachix or any Nix binary cache, without slowing Hydra down."""


@main.command()
@config_option
def run(config_path: Path | None) -> None:
    """Run the daemon: watch the spool, queue paths and push them."""
    import signal
    import threading

    from bridge.daemon import Daemon, DaemonError, DaemonStopped
    from bridge.logsetup import setup_logging
    from bridge.statedb import StateDbError

    config = _load(config_path)
    setup_logging(config.log_level)
    stop = threading.Event()
    daemon = Daemon(config)

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()
        daemon.abort.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        daemon.start()
    except DaemonStopped:
        daemon.shutdown()
        return
    except (DaemonError, StateDbError) as exc:
        daemon.shutdown()
        _fail(str(exc))
    daemon.run_until(stop)


@main.command("enqueue-hydra")
@config_option
@click.option(
    "--json-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Hydra payload to record (default: the file named by $HYDRA_JSON).",
)
def enqueue_hydra(config_path: Path | None, json_file: Path | None) -> None:
    """Record a Hydra RunCommand payload in the spool and return at once (for <runcommand>)."""
    # bridge.entry runs bridge.fastenqueue first; this is where every other case ends.
    import time

    from bridge.producers import PayloadRejected, record_hydra_payload
    from bridge.spool import SpoolLayout, SpoolUnavailable

    target = _load_spool_target(config_path)
    source = json_file or (Path(os.environ["HYDRA_JSON"]) if os.environ.get("HYDRA_JSON") else None)
    if source is None:
        _fail("no payload: set $HYDRA_JSON (Hydra does) or pass --json-file", 2)
    try:
        with source.open("rb") as handle:
            data = handle.read(target.max_event_bytes + 1)
    except OSError as exc:
        _fail(f"cannot read Hydra payload {source}: {exc.strerror}")
    layout = SpoolLayout(Path(target.spool_dir))
    try:
        event, target_file = record_hydra_payload(layout, data, target.max_event_bytes, time.time())
    except (PayloadRejected, SpoolUnavailable) as exc:
        _fail(str(exc))
    click.echo(
        f"recorded build {event.build_id} ({event.project}:{event.jobset}:{event.job}) "
        f"as {target_file.name}"
    )


def _load_spool_target(config_path: Path | None) -> SpoolTarget:
    """Only the settings the producers need (the daemon and check-config check the rest)."""
    from bridge.spooltarget import TargetError, read_spool_target
    from bridge.spooltarget import config_path as find_config

    try:
        return read_spool_target(find_config(None if config_path is None else str(config_path)))
    except TargetError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(1)


@main.command("enqueue-hook")
@config_option
def enqueue_hook(config_path: Path | None) -> None:
    """Record $DRV_PATH and $OUT_PATHS from a Nix post-build-hook; always exits 0."""
    try:
        import time

        from bridge.config import ConfigError, load_config
        from bridge.events import hook_envelope
        from bridge.spool import SpoolLayout, SpoolUnavailable, write_hook_event

        config = load_config(config_path)
        document = hook_envelope(
            os.environ.get("DRV_PATH", ""), os.environ.get("OUT_PATHS", ""), time.time()
        )
        # The hook's own channel: only there do hook events count.
        write_hook_event(SpoolLayout.of(config), document, config.spool.max_event_bytes)
    except (ConfigError, SpoolUnavailable) as exc:
        click.echo(f"hydra-cachix-bridge: warning: build not recorded: {exc}", err=True)
    except Exception as exc:  # a post-build-hook must never fail the build loop
        click.echo(f"hydra-cachix-bridge: warning: build not recorded: {exc!r}", err=True)
    sys.exit(0)


@main.command("hook-script")
@config_option
@click.option(
    "--tools-path",
    default=None,
    metavar="DIRS",
    help="Colon-separated directories with rm, tr and sed, put first on the "
    "hook's PATH (default: the PATH nix-daemon gives the hook).",
)
def hook_script(config_path: Path | None, tools_path: str | None) -> None:
    """Print a POSIX sh post-build-hook bound to the configured spool (no Python at build time)."""
    from bridge.hookscript import hook_directory_problem, render_hook_script
    from bridge.spool import SpoolLayout

    config = _load(config_path)
    layout = SpoolLayout.of(config)
    if not layout.incoming.is_dir() or not layout.hook.is_dir():
        click.echo(
            f"hydra-cachix-bridge: warning: the spool {layout.root} or its hook directory "
            f"{layout.hook} does not exist yet: until `hydra-cachix-bridge init` (or the "
            "daemon's first start, for a private spool) creates it, this hook drops every "
            "build (saying so in the build log)",
            err=True,
        )
    else:
        problem = hook_directory_problem(layout)
        if problem is not None:
            message = (
                f"the hook directory {layout.hook} is not safe for a hook run as this user: "
                f"{problem}. Another user could redirect the hook's writes. Run "
                "`hydra-cachix-bridge init` as root (it makes the spool root and the hook "
                "directory root-owned), or set [spool] hook_dir to a directory that only "
                "root can change"
            )
            if os.geteuid() == 0:
                _fail(message)
            click.echo(f"hydra-cachix-bridge: warning: {message}", err=True)
    click.echo(render_hook_script(layout, tools_path), nl=False)


@main.command()
@config_option
@click.option(
    "--user",
    default=None,
    metavar="USER",
    help="Owner of the directories: the user the daemon runs as (default: this user).",
)
@click.option(
    "--group",
    default=None,
    metavar="GROUP",
    help="Group shared with the producers (Hydra's RunCommand user, the hook's root); "
    "needs [spool] group_writable = true (default: the owner's primary group).",
)
def init(config_path: Path | None, user: str | None, group: str | None) -> None:
    """Create the state and spool directories with the owner, group and modes the producers
    need, before the daemon's first start; safe to run again (repairs what differs)."""
    from bridge.init import InitError, init_directories, resolve_owner

    config = _load(config_path)
    try:
        owner = resolve_owner(config, user, group)
    except InitError as exc:
        _fail(str(exc), 2)
    try:
        lines = init_directories(config, owner)
    except InitError as exc:
        _fail(str(exc))
    for line in lines:
        click.echo(line)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--dead-letters",
    "dead_limit",
    default=10,
    show_default=True,
    help="How many recent dead letters to show.",
)
def status(config_path: Path | None, as_json: bool, dead_limit: int) -> None:
    """Show queue counts per cache and state, last success and failure, and dead letters."""
    import json
    import time

    from bridge.quarantine import summarize
    from bridge.render import hydra_db_document, render_hydra_db, render_status, status_document
    from bridge.spool import SpoolLayout
    from bridge.statedb import StateDb, StateDbError

    config = _load(config_path)
    now = time.time()
    statuses, dead = [], []
    if config.database_path.exists():
        try:
            db = StateDb(config.database_path, create=False)
        except StateDbError as exc:
            _fail(str(exc))
        try:
            statuses = db.cache_statuses(config.caches)
            dead = db.dead_letters(dead_limit)
        finally:
            db.close()
    else:
        from bridge.statedb import CacheStatus
        from exporter.vocabulary import ItemState

        statuses = [
            CacheStatus(name, dict.fromkeys(ItemState, 0), None, None, None, None)
            for name in config.caches
        ]
    from bridge.statelock import daemon_running

    running = daemon_running(config.state_dir)
    rejected = summarize(SpoolLayout(config.spool_dir))
    source = _hydra_db_status(config) if config.hydra_db is not None else None
    if as_json:
        document = status_document(statuses, dead, now, running, quarantine=rejected)
        if config.hydra_db is not None:
            document["hydra_db"] = hydra_db_document(source, now)
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(render_status(statuses, dead, now, running, quarantine=rejected), nl=False)
        if config.hydra_db is not None:
            click.echo("\n" + render_hydra_db(source, now, running), nl=False)


def _hydra_db_status(config: Config) -> SourceStatus | None:
    from bridge.hydrastate import HydraState
    from bridge.statedb import StateDb, StateDbError

    if not config.database_path.exists():
        return None
    try:
        db = StateDb(config.database_path, create=False)
    except StateDbError:
        return None
    try:
        return HydraState(db.conn).status()
    finally:
        db.close()


@main.command()
@config_option
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead-lettered path.")
@click.argument("ids", nargs=-1, type=int)
def retry(config_path: Path | None, retry_all: bool, ids: tuple[int, ...]) -> None:
    """Put dead-lettered paths (by ID from `status`, or --all) back into the queue."""
    import time

    from bridge.statedb import StateDb, StateDbError
    from bridge.statelock import daemon_running

    if retry_all == bool(ids):
        _fail("give either --all or one or more IDs (see `hydra-cachix-bridge status`)", 2)
    config = _load(config_path)
    try:
        db = StateDb(config.database_path, create=False)
    except StateDbError as exc:
        _fail(str(exc))
    try:
        count = db.retry_dead(None if retry_all else list(ids), time.time())
    finally:
        db.close()
    _log_retry(config, count, "all" if retry_all else ", ".join(f"#{i}" for i in ids))
    click.echo(f"{count} dead-lettered path(s) queued again")
    if count and not daemon_running(config.state_dir):
        click.echo(
            "the daemon is not running: they are pushed when it starts "
            "(systemctl start hydra-cachix-bridge)"
        )
    if ids and count < len(ids):
        _fail(f"{len(ids) - count} of the IDs given are not dead letters")


def _log_retry(config: Config, count: int, which: str) -> None:
    """One line in the journal too, so the log tells the retry beside the daemon's lines."""
    from bridge.syslogline import syslog_line

    syslog_line(
        f"retry ({which}) by uid {os.getuid()}: {count} dead-lettered path(s) queued again"
        f" in {config.database_path}"
    )


@main.command()
@config_option
@click.option(
    "--jobset",
    "jobset_name",
    required=True,
    metavar="PROJECT:JOBSET",
    help="The Hydra jobset whose finished builds are recorded.",
)
@click.option("--eval", "eval_id", type=int, default=None, help="Only this evaluation's builds.")
@click.option("--latest", is_flag=True, help="Only the builds of the jobset's latest evaluation.")
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    default=None,
    help="Only builds that finished at or after this local date/time.",
)
@click.option(
    "--dry-run", is_flag=True, help="Only print how many builds and paths each cache would get."
)
def backfill(
    config_path: Path | None,
    jobset_name: str,
    eval_id: int | None,
    latest: bool,
    since: datetime.datetime | None,
    dry_run: bool,
) -> None:
    """Record the finished builds of a Hydra jobset from its database (source `backfill`).

    Needs [hydra_db] in the config. Safe to interrupt and run again: builds already
    recorded by backfill are skipped, and paths already queued or pushed are not queued
    twice. The running daemon pushes what is recorded.
    """
    import time

    from prometheus_client import CollectorRegistry

    from bridge.daemon import DaemonError, require_hydra_db_driver

    project, _, jobset = jobset_name.partition(":")
    if not project or not jobset or ":" in jobset:
        _fail(f"--jobset must be PROJECT:JOBSET, got {jobset_name!r}", 2)
    if eval_id is not None and latest:
        _fail("give --eval ID or --latest, not both", 2)
    if eval_id is None and not latest and since is None:
        _fail("give --eval ID, --latest or --since DATE (or several: they narrow down)", 2)
    config = _load(config_path)
    if config.hydra_db is None:
        _fail("backfill reads Hydra's database: add a [hydra_db] table with its dsn to the config")
    try:
        require_hydra_db_driver()
    except DaemonError as exc:
        _fail(str(exc))

    import psycopg

    from bridge.backfill import Backfill, BackfillError, Selection
    from bridge.clock import SystemClock
    from bridge.hydradb import HydraReader, connect
    from bridge.intake import Intake
    from bridge.render import render_backfill
    from bridge.secrets import SecretError
    from bridge.statedb import StateDb, StateDbError

    selection = Selection(
        project, jobset, eval_id, latest, None if since is None else int(since.timestamp())
    )
    try:
        conn = connect(config.hydra_db)
    except (psycopg.Error, SecretError) as exc:
        _fail(f"cannot connect to Hydra's database: {exc}")
    try:
        db = StateDb(config.database_path)
    except StateDbError as exc:
        conn.close()
        _fail(str(exc))
    try:
        clock = SystemClock()
        intake = Intake(config.rules, _offline_metrics(CollectorRegistry()), clock)
        job = Backfill(HydraReader(conn), db, intake, clock)
        total = job.count(selection)
        label = "counting" if dry_run else "recording"
        with click.progressbar(length=total, label=f"{label} {total} build(s)") as bar:
            report = job.run(selection, dry_run=dry_run, progress=bar.update)
    except BackfillError as exc:
        _fail(str(exc))
    except psycopg.Error as exc:
        _fail(f"reading Hydra's database failed: {exc}")
    finally:
        db.close()
        conn.close()
    click.echo(render_backfill(report, selection, dry_run, time.time()), nl=False)


def _offline_metrics(registry: CollectorRegistry) -> BridgeMetrics:
    from bridge import __version__
    from exporter.metrics import BridgeMetrics

    return BridgeMetrics(registry, version=__version__, caches={})


@main.command("check-config")
@config_option
@click.option(
    "--offline",
    is_flag=True,
    help="Check the file alone (syntax, types, rules), not this host: for build-time checks "
    "where secrets, executables and directories are not there yet.",
)
def check_config(config_path: Path | None, offline: bool) -> None:
    """Check the config, and unless --offline that it can work on this host; print it.

    Exits 1 with `FILE:KEY: message` lines when the file is invalid or, on this host, a
    secret file cannot be read, the backend's executable is missing, or a directory the
    daemon writes cannot be written or created. Warnings go to stderr without failing.
    """
    from bridge.preflight import check_host
    from bridge.render import render_config

    config = _load(config_path)
    for warning in config.warnings:
        click.echo(warning, err=True)
    problems = [] if offline else check_host(config)
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        sys.exit(1)
    click.echo(render_config(config), nl=False)


@main.command()
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the demo keeps its state and binary cache (default: embedded default).",
)
@click.option("--builds", default=5, show_default=True, help="How many derivations to build.")
@click.option(
    "--timeout", default=120.0, show_default=True, help="Give up after this many seconds."
)
def demo(state_dir: Path | None, builds: int, timeout: float) -> None:
    """Build a few real derivations with the hook, replay a Hydra payload, push, summarise."""
    from bridge.demo import DemoError, run_demo
    from bridge.logsetup import setup_logging

    setup_logging("warning")
    try:
        summary = run_demo(state_dir=state_dir, builds=builds, timeout=timeout, echo=click.echo)
    except DemoError as exc:
        _fail(str(exc))
    click.echo(summary)
