"""The closed vocabularies of the bridge: sources, states, reasons and backends.

Each is a `StrEnum`: its members are the strings stored in the state database, written in
the spool and logs, and used as metric label values. They live beside the metrics because
every label set is one of them, and the exporter imports nothing from the daemon.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Source(StrEnum):
    """Where an event came from."""

    HYDRA = "hydra"
    """A Hydra RunCommand payload, written by `enqueue-hydra`."""
    HOOK = "hook"
    """A Nix post-build-hook line."""
    LOG = "log"
    """Store paths read from a followed log file."""
    HYDRA_DB = "hydra-db"
    """A finished build read from Hydra's PostgreSQL."""
    BACKFILL = "backfill"
    """A build recorded by `hydra-cachix-bridge backfill`."""


# Sources that describe a Hydra build (project, jobset, job, status).
HYDRA_SOURCES: Final = frozenset({Source.HYDRA, Source.HYDRA_DB, Source.BACKFILL})


class ItemState(StrEnum):
    """The state of one (cache, path) item in the queue."""

    PENDING = "pending"
    INFLIGHT = "inflight"
    PUSHED = "pushed"
    SKIPPED = "skipped"
    DEAD = "dead"


class RejectReason(StrEnum):
    """Why an event (file, line or row) was rejected and quarantined."""

    INVALID_JSON = "invalid_json"
    INVALID_ENCODING = "invalid_encoding"
    INVALID_EVENT = "invalid_event"
    INVALID_STORE_PATH = "invalid_store_path"
    TOO_LARGE = "too_large"
    NOT_REGULAR_FILE = "not_regular_file"
    UNREADABLE = "unreadable"
    UNRESOLVED_OUTPUTS = "unresolved_outputs"
    FOREIGN_OUTPUTS = "foreign_outputs"
    INVALID_BUILD_ROW = "invalid_build_row"
    UNTRUSTED_CHANNEL = "untrusted_channel"
    INCOMPLETE_EVENT = "incomplete_event"


class IgnoreReason(StrEnum):
    """Why a valid event queued nothing."""

    NO_RULE = "no_rule"
    STATUS_FILTERED = "status_filtered"
    EXCLUDED = "excluded"
    NO_OUTPUTS = "no_outputs"


# The outcome of an event that queued at least one path (else the outcome is an IgnoreReason).
MATCHED: Final = "matched"


class FailureReason(StrEnum):
    """Why one push invocation failed."""

    EXIT_STATUS = "exit_status"
    SIGNAL = "signal"
    TIMEOUT = "timeout"
    SPAWN_ERROR = "spawn_error"
    INVALID_PATH = "invalid_path"
    SECRET = "secret"  # noqa: S105 (a failure reason, not a password)


class SkipReason(StrEnum):
    """Why an item left the queue without being pushed."""

    INVALID_PATH = "invalid_path"


class BackendKind(StrEnum):
    """How a cache is pushed to."""

    CACHIX = "cachix"
    NIX_COPY = "nix-copy"
