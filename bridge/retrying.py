"""Back off and log sparingly while a resource (the database, a full disk) keeps failing."""

from __future__ import annotations

import logging


class FailureBackoff:
    """Doubling pauses between attempts; a traceback for the first failure only."""

    def __init__(
        self, what: str, logger: logging.Logger, initial: float = 1.0, maximum: float = 30.0
    ) -> None:
        self.what = what
        self.log = logger
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def failed(self, exc: BaseException) -> float:
        """Record a failure (inside an except block); return how long to pause."""
        self.failures += 1
        delay = min(self.maximum, self.initial * 2.0 ** (self.failures - 1))
        if self.failures == 1:
            self.log.exception("%s failed; retrying in %.0fs", self.what, delay)
        else:
            self.log.warning(
                "%s still failing (%d times): %s; retrying in %.0fs",
                self.what,
                self.failures,
                exc,
                delay,
            )
        return delay

    def succeeded(self) -> None:
        """Record a success; say so if it ends a run of failures."""
        if self.failures:
            self.log.info("%s works again after %d failure(s)", self.what, self.failures)
            self.failures = 0
