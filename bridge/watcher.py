"""Watch the spool's incoming directory with watchdog and hand file names to the ingest loop."""

from __future__ import annotations

import os
import queue
from collections.abc import Sequence
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

Notification = tuple[Path, bool]
"""A file that appeared, and whether its writer is known to be done (renamed in or closed)."""


class _Handler(FileSystemEventHandler):
    def __init__(self, sink: queue.SimpleQueue[Notification | None]) -> None:
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            if event.dest_path:  # empty when moved out to a directory not watched
                self.sink.put((Path(os.fsdecode(event.dest_path)), True))
        elif isinstance(event, FileClosedEvent):
            self.sink.put((Path(os.fsdecode(event.src_path)), True))
        elif isinstance(event, FileCreatedEvent):
            self.sink.put((Path(os.fsdecode(event.src_path)), False))


class SpoolWatcher:
    """An inotify watch on incoming/ (and the hook directory); restartable when one of them
    is replaced or a watched-for directory appears."""

    def __init__(
        self,
        directory: Path,
        sink: queue.SimpleQueue[Notification | None],
        also: Sequence[Path] = (),
    ) -> None:
        self.directory = directory
        self.also = tuple(also)
        self.sink = sink
        self.observer: BaseObserver | None = None
        self.watched: tuple[int, int] | None = None
        self.watched_also: dict[Path, tuple[int, int] | None] = {}

    def start(self) -> None:
        """Start watching (before the initial scan, so nothing falls between the two)."""
        observer = _observer()
        handler = _Handler(self.sink)
        observer.schedule(handler, str(self.directory), recursive=False)
        info = os.stat(self.directory)
        watched_also: dict[Path, tuple[int, int] | None] = {}
        for extra in self.also:
            identity = _identity(extra)
            if identity is not None:
                observer.schedule(handler, str(extra), recursive=False)
            watched_also[extra] = identity
        observer.start()
        self.watched = (info.st_dev, info.st_ino)
        self.watched_also = watched_also
        self.observer = observer

    def alive(self) -> bool:
        """True while the observer runs and the watched directories are still the same ones
        (a directory that was missing at start and exists now counts as a change)."""
        if self.observer is None or not self.observer.is_alive() or self.watched is None:
            return False
        if _identity(self.directory) != self.watched:
            return False
        return all(_identity(extra) == known for extra, known in self.watched_also.items())

    def stop(self) -> None:
        """Stop the observer thread."""
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None


def _observer() -> BaseObserver:
    """inotify with full move events: a file renamed in from tmp/, which is not watched, is
    then a move (its writer is done), not a creation, so a defective one is quarantined at
    once. Where inotify is missing (not Linux), watchdog's default observer."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except Exception:  # ImportError, or watchdog's UnsupportedLibcError
        return Observer()
    return InotifyObserver(generate_full_events=True)


def _identity(directory: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)
