"""The polled worklist fragment's version (ETag), and the "unchanged" answer that needs no page built.

Every open worklist asks every few seconds whether anything changed. The version of a fragment is a hash of
its HTML without the parts that move by themselves: the strip's "Updated" clock and the ticking waiting and
"open for" labels (the browser advances those, web/static/app.js). Building the fragment to hash it costs a
page's worth of queries and rendering; instead each web process remembers, for each request (path, query,
viewer and role) and core.worklist_version state, the version it last sent. A poll whose If-None-Match holds
that version while the state is the same gets 304 after four small statements. Any change of state misses,
and the fragment is built and hashed as before, so a stale 304 would need a change that the state does not
cover: core.worklist_version lists what it covers, and tests/test_poll.py changes each one.
"""
from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict

from fastapi import Request

from core.models import utcnow
from core.worklist_version import worklist_state

# Parts of the fragment that change with the clock alone (see the module docstring).
_MOVING = re.compile(rb'<time datetime="[^"]*">[^<]*</time>|<time class="tick"[^>]*>[^<]*</time>')


def version_tag(body: bytes) -> str:
    """The fragment's ETag: a hash of its HTML without the clock and the ticking labels."""
    return '"' + hashlib.sha256(_MOVING.sub(b"", body)).hexdigest()[:32] + '"'


def asked_for(request: Request) -> list[str]:
    """The versions the client already has (If-None-Match)."""
    return [tag.strip() for tag in request.headers.get("if-none-match", "").split(",") if tag.strip()]


class Versions:
    """A bounded, thread-safe map from (request, worklist state) to the version last sent for it."""

    def __init__(self, size: int = 2048):
        self.size = size
        self._tags: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> str | None:
        with self._lock:
            tag = self._tags.get(key)
            if tag is not None:
                self._tags.move_to_end(key)
            return tag

    def put(self, key: tuple, tag: str) -> None:
        with self._lock:
            self._tags[key] = tag
            self._tags.move_to_end(key)
            while len(self._tags) > self.size:
                self._tags.popitem(last=False)


VERSIONS = Versions()


def request_key(request: Request, session, settings) -> tuple:
    """What the fragment for this request depends on, read before the fragment is built: a change committed
    while it is built then only makes the version stored under this key newer than the key, never older."""
    user = getattr(request.state, "user", None)
    state = worklist_state(session, now=utcnow(), max_wait_minutes=settings.max_wait_minutes,
                           worker_alive_seconds=settings.worker_alive_seconds,
                           reading_expire_seconds=settings.reading_claim_seconds,
                           viewer_id=user.id if user is not None else None)
    who = (user.id, user.role) if user is not None else None
    return request.url.path, tuple(sorted(request.query_params.multi_items())), who, state
