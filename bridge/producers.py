"""What the producer commands do, without the command line: validate, then write the spool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bridge.events import Event, EventRejected, decode_json, hydra_envelope, parse_hydra_payload
from bridge.spool import SpoolLayout, quarantine_bytes, write_event


@dataclass(frozen=True)
class PayloadRejected(Exception):
    """An invalid Hydra payload; saved into quarantine when possible."""

    reason: str
    message: str
    saved_as: Path | None
    save_error: str | None

    def __str__(self) -> str:
        where = (
            f"saved as {self.saved_as}"
            if self.saved_as is not None
            else f"could not be saved: {self.save_error}"
        )
        return f"invalid Hydra payload ({self.reason}): {self.message}; {where}"


def record_hydra_payload(
    layout: SpoolLayout, data: bytes, max_bytes: int, now: float
) -> tuple[Event, Path]:
    """Validate a RunCommand payload and write it into the spool.

    Raises PayloadRejected (the payload went to quarantine) or SpoolUnavailable (it could
    not be recorded at all).
    """
    try:
        if len(data) > max_bytes:
            raise EventRejected("too_large", f"payload over {max_bytes} bytes")
        payload = decode_json(data)
        event = parse_hydra_payload(payload, now)
        # The limit applies to the file the daemon will read, envelope included.
        target = write_event(layout, "hydra", hydra_envelope(payload, now), max_bytes)
    except EventRejected as exc:
        try:
            saved = quarantine_bytes(layout, "hydra", data, exc.reason, exc.message, now)
        except OSError as err:
            raise PayloadRejected(exc.reason, exc.message, None, err.strerror) from None
        raise PayloadRejected(exc.reason, exc.message, saved, None) from None
    return event, target
