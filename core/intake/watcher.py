"""The inbox watcher: watchdog events, the start-up scan and the periodic sweep, feeding core.intake.ingest."""
from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from watchdog.events import (FileClosedEvent, FileCreatedEvent, FileMovedEvent, FileSystemEvent,
                             FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from core.intake import claim
from core.intake.ingest import Enqueue, inbox_files, ingest_file, is_candidate, requeue_stale
from core.intake.sender import EnqueueGroup, GroupSender, one_by_one
from core.settings import Settings

log = logging.getLogger(__name__)


class _Handler(FileSystemEventHandler):
    def __init__(self, ingester: "Ingester"):
        self.ingester = ingester

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.ingester.submit(os.fsdecode(event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.ingester.submit(os.fsdecode(event.dest_path), renamed_in=True)

    # A missed "created" (a file opened before we started watching) still shows up as its close, and the
    # start-up scan lists it anyway.
    on_closed = on_created


# Only the events the handler acts on: watchdog then asks inotify for just these, instead of every open, write,
# attribute change, deletion and folder change in the inbox (11.4 handler calls per film in a profiled burst, and
# a sender writing in chunks adds write events; README's performance section has the ingester's figures).
EVENTS = [FileCreatedEvent, FileMovedEvent, FileClosedEvent]


def _observer() -> BaseObserver:
    """The platform's observer; on Linux, one whose inotify watch leaves out IN_MOVED_FROM.

    Every claim renames a file out of the inbox (core.intake.claim), which inotify reports as an IN_MOVED_FROM
    with no IN_MOVED_TO in the watched folder. watchdog holds such an event for 0.5 s, waiting for its pair, at
    the head of its queue, and every event behind it waits too: with films arriving every 0.15 s, drop →
    ingested was 0.40 s at the median instead of the stability wait's 0.20. Without IN_MOVED_FROM, a file renamed
    into the inbox (its IN_MOVED_TO) reaches the handler at once, as a move with no source (watchdog's "full"
    emitter); moves out of the inbox are of no use to the ingester.
    """
    if not sys.platform.startswith("linux"):
        return Observer()
    from watchdog.observers.inotify import InotifyFullEmitter
    from watchdog.observers.inotify_c import InotifyConstants

    class InboxEmitter(InotifyFullEmitter):
        def get_event_mask_from_filter(self):
            return super().get_event_mask_from_filter() & ~InotifyConstants.IN_MOVED_FROM

    return BaseObserver(InboxEmitter)


class Ingester:
    """Wires watchdog to ingest_file, sends committed studies through a GroupSender (`enqueue_group`: one message
    for several studies; by default `enqueue` once per study), and runs the start-up scan and the stale
    re-enqueue sweep."""

    def __init__(self, settings: Settings, enqueue: Enqueue, *, enqueue_group: EnqueueGroup | None = None,
                 threads: int = 4, sweep_seconds: float | None = None):
        self.settings, self.enqueue, self.threads = settings, enqueue, threads
        self._sender = GroupSender(settings, enqueue_group or one_by_one(enqueue), busy=self._busy)
        # The sweep also rescans the inbox, so a file whose event was lost is still ingested.
        self.sweep_seconds = sweep_seconds or max(0.5, min(60.0, settings.requeue_after_seconds / 4))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._inflight: set[Path] = set()
        self._renamed: set[Path] = set()  # inbox entries the watcher saw renamed in (ingest_file's renamed_in)
        self._pool: ThreadPoolExecutor | None = None
        self._observer = None
        self._sweeper: threading.Thread | None = None

    def start(self) -> "Ingester":
        """Starts watching; files already in the inbox are ingested at once."""
        self.settings.ensure_dirs()
        self._sender.start()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ingest")
        self._observer = _observer()
        self._observer.schedule(_Handler(self), str(self.settings.inbox), recursive=False, event_filter=EVENTS)
        self._observer.start()  # before the first scan, so nothing arriving meanwhile is missed
        self._sweeper = threading.Thread(target=self._sweep_loop, name="ingest-sweep", daemon=True)
        self._sweeper.start()
        log.info("watching %s (archive %s)", self.settings.inbox, self.settings.archive_dir)
        return self

    def submit(self, path: str | Path, *, renamed_in: bool = False) -> None:
        """Queues an inbox file (or a file left in the claim folder) for ingestion unless it is already being
        handled; `renamed_in`: the watcher saw it renamed into the inbox (see ingest_file)."""
        path = Path(path)
        if self._stop.is_set():
            return
        if not claim.is_claimed(path, inbox=self.settings.inbox) and (path.parent != self.settings.inbox
                                                                      or not is_candidate(path)):
            return
        with self._lock:
            if renamed_in:
                self._renamed.add(path)  # also when in flight: the sweep may have started its wait first
            if path in self._inflight:
                return
            self._inflight.add(path)
        try:
            self._pool.submit(self._ingest, path)
        except RuntimeError:  # pool shut down while stopping
            with self._lock:
                self._inflight.discard(path)
                self._renamed.discard(path)

    def _ingest(self, path: Path) -> None:
        try:
            ingest_file(path, settings=self.settings, enqueue=self.enqueue, stop=self._stop,
                        hand_over=self._sender.submit, renamed_in=lambda: path in self._renamed)
        except Exception:
            log.exception("could not ingest %s; it stays in the inbox or claim folder and is retried", path)
        finally:
            with self._lock:
                self._inflight.discard(path)
                self._renamed.discard(path)
            self._sender.poke()

    def _busy(self) -> int:
        """Files being ingested now (the sender lets a group fill while there are some)."""
        with self._lock:
            return len(self._inflight)

    def _sweep_loop(self) -> None:
        while not self._stop.is_set():
            for path in inbox_files(self.settings):
                self.submit(path)
            try:
                requeue_stale(settings=self.settings, enqueue=self.enqueue, skip=self._sender.in_flight)
            except Exception:
                log.exception("stale re-enqueue sweep failed; retrying in %ss", self.sweep_seconds)
            self._stop.wait(self.sweep_seconds)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops watching and waits for files being ingested to finish."""
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
        if self._sweeper is not None:
            self._sweeper.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._sender.stop(timeout)  # after the pool: what its last files committed is sent first

    def __enter__(self) -> "Ingester":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
