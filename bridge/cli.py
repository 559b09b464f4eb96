"""Command line: parses options and wires objects; the work lives in the core modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from bridge import __version__

if TYPE_CHECKING:
    from bridge.config import Config

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hydra-cachix-bridge")
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
    from bridge.queue import QueueError

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
    except (DaemonError, QueueError) as exc:
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
    import time

    from bridge.producers import PayloadRejected, record_hydra_payload
    from bridge.spool import SpoolLayout, SpoolUnavailable

    config = _load(config_path)
    source = json_file or (Path(os.environ["HYDRA_JSON"]) if os.environ.get("HYDRA_JSON") else None)
    if source is None:
        _fail("no payload: set $HYDRA_JSON (Hydra does) or pass --json-file", 2)
    try:
        with source.open("rb") as handle:
            data = handle.read(config.spool.max_event_bytes + 1)
    except OSError as exc:
        _fail(f"cannot read Hydra payload {source}: {exc.strerror}")
    layout = SpoolLayout(config.spool_dir)
    try:
        event, target = record_hydra_payload(
            layout, data, config.spool.max_event_bytes, time.time()
        )
    except (PayloadRejected, SpoolUnavailable) as exc:
        _fail(str(exc))
    click.echo(
        f"recorded build {event.build_id} ({event.project}:{event.jobset}:{event.job}) "
        f"as {target.name}"
    )


@main.command("enqueue-hook")
@config_option
def enqueue_hook(config_path: Path | None) -> None:
    """Record $DRV_PATH and $OUT_PATHS from a Nix post-build-hook; always exits 0."""
    try:
        import time

        from bridge.config import ConfigError, load_config
        from bridge.events import hook_envelope
        from bridge.spool import SpoolLayout, SpoolUnavailable, write_event

        config = load_config(config_path)
        document = hook_envelope(
            os.environ.get("DRV_PATH", ""), os.environ.get("OUT_PATHS", ""), time.time()
        )
        write_event(SpoolLayout(config.spool_dir), "hook", document)
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
    help="Colon-separated directories with mv, mkdir, tr and sed, put first on the "
    "hook's PATH (default: the PATH nix-daemon gives the hook).",
)
def hook_script(config_path: Path | None, tools_path: str | None) -> None:
    """Print a POSIX sh post-build-hook bound to the configured spool (no Python at build time)."""
    from bridge.hookscript import render_hook_script
    from bridge.spool import SpoolLayout

    config = _load(config_path)
    click.echo(render_hook_script(SpoolLayout(config.spool_dir), tools_path), nl=False)


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
    from bridge.queue import Queue, QueueError
    from bridge.render import render_status, status_document
    from bridge.spool import SpoolLayout

    config = _load(config_path)
    now = time.time()
    statuses, dead = [], []
    if config.database_path.exists():
        try:
            queue = Queue(config.database_path, create=False)
        except QueueError as exc:
            _fail(str(exc))
        try:
            statuses = queue.cache_statuses(config.caches)
            dead = queue.dead_letters(dead_limit)
        finally:
            queue.close()
    else:
        from bridge.queue import STATES, CacheStatus

        statuses = [
            CacheStatus(name, dict.fromkeys(STATES, 0), None, None, None, None)
            for name in config.caches
        ]
    running = _daemon_running(config)
    rejected = summarize(SpoolLayout(config.spool_dir))
    if as_json:
        document = status_document(statuses, dead, now, running, quarantine=rejected)
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(render_status(statuses, dead, now, running, quarantine=rejected), nl=False)


def _daemon_running(config: Config) -> bool:
    import fcntl

    from bridge.daemon import lock_path

    try:
        fd = os.open(lock_path(config.state_dir), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@main.command()
@config_option
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead-lettered path.")
@click.argument("ids", nargs=-1, type=int)
def retry(config_path: Path | None, retry_all: bool, ids: tuple[int, ...]) -> None:
    """Put dead-lettered paths (by ID from `status`, or --all) back into the queue."""
    import time

    from bridge.queue import Queue, QueueError

    if retry_all == bool(ids):
        _fail("give either --all or one or more IDs (see `hydra-cachix-bridge status`)", 2)
    config = _load(config_path)
    try:
        queue = Queue(config.database_path, create=False)
    except QueueError as exc:
        _fail(str(exc))
    try:
        count = queue.retry_dead(None if retry_all else list(ids), time.time())
    finally:
        queue.close()
    _log_retry(config, count, "all" if retry_all else ", ".join(f"#{i}" for i in ids))
    click.echo(f"{count} dead-lettered path(s) queued again")
    if ids and count < len(ids):
        _fail(f"{len(ids) - count} of the IDs given are not dead letters")


def _log_retry(config: Config, count: int, which: str) -> None:
    """One line in the journal too, so the log tells the retry beside the daemon's lines."""
    from bridge.syslogline import syslog_line

    syslog_line(
        f"retry ({which}) by uid {os.getuid()}: {count} dead-lettered path(s) queued again"
        f" in {config.database_path}"
    )


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the config and print the effective settings (secrets are never shown)."""
    from bridge.render import render_config

    config = _load(config_path)
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
