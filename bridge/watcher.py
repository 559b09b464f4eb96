"""Watch the spool's incoming directory with watchdog and hand file names to the ingest loop."""

from __future__ import annotations

import os
import queue
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
            self.sink.put((Path(os.fsdecode(event.dest_path)), True))
        elif isinstance(event, FileClosedEvent):
            self.sink.put((Path(os.fsdecode(event.src_path)), True))
        elif isinstance(event, FileCreatedEvent):
            self.sink.put((Path(os.fsdecode(event.src_path)), False))


class SpoolWatcher:
    """An inotify watch on incoming/; restartable when the directory is replaced."""

    def __init__(self, directory: Path, sink: queue.SimpleQueue[Notification | None]) -> None:
        self.directory = directory
        self.sink = sink
        self.observer: BaseObserver | None = None
        self.watched: tuple[int, int] | None = None

    def start(self) -> None:
        """Start watching (before the initial scan, so nothing falls between the two)."""
        observer = Observer()
        observer.schedule(_Handler(self.sink), str(self.directory), recursive=False)
        observer.start()
        info = os.stat(self.directory)
        self.watched = (info.st_dev, info.st_ino)
        self.observer = observer

    def alive(self) -> bool:
        """True while the observer runs and the watched directory is still the same one."""
        if self.observer is None or not self.observer.is_alive() or self.watched is None:
            return False
        try:
            info = os.stat(self.directory)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.watched

    def stop(self) -> None:
        """Stop the observer thread."""
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None
