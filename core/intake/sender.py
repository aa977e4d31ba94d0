"""The ingester's sender: committed studies go to the broker from one thread, in small groups.

In a burst each film used to cost the ingester a publish and a transaction of its own for `enqueued_at`, and
the worker a message of its own, most of them naming a study another pass had already scored (the drain loop
claims companions). Films committed together now go as one `score_batch` message of at most GROUP_MAX ids, and
one UPDATE records them as sent. The order of the two is the crash-safety rule: `enqueued_at` is set only once
the message is out, so a study whose publish failed, or was never made because the process stopped, has NULL
and the next sweep sends it at once (core.intake.staleness). A publish that went out but was not recorded is
sent again by a sweep later, which claim tokens make harmless.

A lone film is sent at once. The sender lingers (at most LINGER_SECONDS) only while other files are still being
ingested, so the films of a burst share messages and a film at idle waits for nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from core import repository as repo
from core.db import session_scope
from core.settings import Settings

log = logging.getLogger(__name__)

EnqueueGroup = Callable[[list[int]], None]
# Companions fill a worker's pass anyway, so a larger group would only let one pool process take more than a
# pass's share of the burst: 4 is the smallest burst batch a CPU worker measures (core.ml.precision).
GROUP_MAX = 4
LINGER_SECONDS = 0.05


def one_by_one(enqueue: Callable[[int], None]) -> EnqueueGroup:
    """Turns a one-study enqueue callback into a group one (a message per study)."""
    def group(study_ids: list[int]) -> None:
        for sid in study_ids:
            enqueue(sid)
    return group


class GroupSender:
    """Sends committed studies from one thread; `in_flight()` names those submitted and not yet recorded as
    sent, which the stale sweep leaves alone."""

    def __init__(self, settings: Settings, enqueue_group: EnqueueGroup, *, busy: Callable[[], int] = lambda: 0,
                 group_max: int = GROUP_MAX, linger: float = LINGER_SECONDS):
        self.settings, self.enqueue_group, self.busy = settings, enqueue_group, busy
        self.group_max, self.linger = group_max, linger
        self._cond = threading.Condition()
        self._waiting: list[int] = []
        self._in_flight: set[int] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> "GroupSender":
        self._thread = threading.Thread(target=self._loop, name="ingest-send", daemon=True)
        self._thread.start()
        return self

    def submit(self, study_id: int) -> None:
        """Hands over a committed queued study; it is sent within moments (or by the sweep if that fails)."""
        with self._cond:
            self._waiting.append(study_id)
            self._in_flight.add(study_id)
            self._cond.notify()

    def poke(self) -> None:
        """Says a file finished ingesting: a lingering group need not wait for it any longer."""
        with self._cond:
            self._cond.notify()

    def in_flight(self) -> set[int]:
        with self._cond:
            return set(self._in_flight)

    def stop(self, timeout: float = 10.0) -> None:
        """Sends what was handed over, then ends the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[int] | None:
        """Waits for studies and returns the next group (None once stopping with nothing left)."""
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            deadline = time.monotonic() + self.linger
            # Other files still being ingested will be ready within moments: let the group fill a little.
            while (not self._stopping and len(self._waiting) < self.group_max and self.busy() > 0
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            if not self._waiting:
                return None
            group, self._waiting = self._waiting[:self.group_max], self._waiting[self.group_max:]
            return group

    def _loop(self) -> None:
        while (group := self._take()) is not None:
            try:
                self._send(group)
            except Exception:  # never let the thread die: what was not recorded is the sweep's
                log.exception("sending studies %s failed; the sweep sends them again", group)
            finally:
                with self._cond:
                    self._in_flight.difference_update(group)

    def _send(self, group: list[int]) -> None:
        try:
            self.enqueue_group(group)
        except Exception as exc:
            log.warning("could not enqueue studies %s (%s); they stay queued and are re-sent within %ss",
                        group, exc, self.settings.requeue_after_seconds)
            return
        try:
            with session_scope(self.settings.database_url) as session:
                repo.mark_enqueued(session, study_ids=group)
        except Exception as exc:  # the message is out; at worst the sweep sends it again (tasks are idempotent)
            log.warning("studies %s enqueued but not marked (%s)", group, exc)
