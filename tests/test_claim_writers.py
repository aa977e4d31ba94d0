"""The stability wait, and a sender that pauses past it still holding its file open: ingest must see that."""
from __future__ import annotations

import os
import threading
import time

import pytest

from core.intake import claim


class _Sleeps:
    """Stands in for time.sleep in core.intake.claim: records each pause and really sleeps it."""

    def __init__(self):
        self.pauses: list[float] = []
        self._sleep = time.sleep  # the real one (claim.time is the time module itself)

    def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self._sleep(seconds)


def test_an_entry_idle_on_disk_for_the_wait_is_stable_at_the_first_look(tmp_path, monkeypatch):
    """A file whose last change (its ctime: writes, renames) is older than the wait needs no second look: in a
    burst the films queued behind the ingest threads pass at once."""
    path = tmp_path / "film.jpeg"
    path.write_bytes(b"a whole film")
    time.sleep(0.35)
    sleeps = _Sleeps()
    monkeypatch.setattr(claim.time, "sleep", sleeps)
    assert claim.wait_until_stable(path, 0.3)
    assert sleeps.pauses == []


@pytest.mark.parametrize("touch", ["write", "rename"])
def test_an_entry_changed_within_the_wait_is_watched_for_the_whole_wait(tmp_path, monkeypatch, touch):
    """A file written (or renamed into place) just now is looked at until it has been unchanged for the wait."""
    path = tmp_path / "film.jpeg"
    if touch == "write":
        path.write_bytes(b"a whole film")
    else:
        (tmp_path / "old.part").write_bytes(b"a whole film")
        time.sleep(0.35)  # its data is old; the rename is new
        os.rename(tmp_path / "old.part", path)
    sleeps = _Sleeps()
    monkeypatch.setattr(claim.time, "sleep", sleeps)
    started = time.monotonic()
    assert claim.wait_until_stable(path, 0.3)
    assert time.monotonic() - started >= 0.3 - 0.02  # the ctime's clock is a little coarser than monotonic
    assert len(sleeps.pauses) >= 2


def test_writer_open_tells_a_held_file_from_a_closed_one(tmp_path):
    path = tmp_path / "film.png"
    writer = open(path, "wb")
    writer.write(b"first third")
    writer.flush()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert claim.writer_open(fd)  # paused, not finished
        writer.close()
        assert not claim.writer_open(fd)
    finally:
        os.close(fd)


def test_wait_writers_closed_returns_once_the_sender_closes(tmp_path):
    path = tmp_path / "film.png"
    writer = open(path, "wb")
    fd = os.open(path, os.O_RDONLY)

    def finish():
        time.sleep(0.3)
        writer.write(b"the rest")
        writer.close()
    t = threading.Thread(target=finish)
    t.start()
    try:
        claim.wait_writers_closed(fd, 30.0)
        assert not claim.writer_open(fd) and os.fstat(fd).st_size == len(b"the rest")
    finally:
        t.join()
        os.close(fd)


def test_a_file_renamed_in_and_closed_is_stable_at_once_and_one_still_held_open_waits(tmp_path, monkeypatch):
    """A rename into the inbox is the sender's "done": a file no process holds open for writing is taken at
    once; one a sender still holds open for writing gets the whole stability wait."""
    sleeps = _Sleeps()
    monkeypatch.setattr(claim.time, "sleep", sleeps)
    done = tmp_path / "done.dcm"
    done.write_bytes(b"a whole instance")
    assert claim.wait_until_stable(done, 0.3, renamed_in=True)
    assert sleeps.pauses == []

    held = tmp_path / "held.dcm"
    with open(held, "wb") as writer:
        writer.write(b"half an instance")
        writer.flush()
        started = time.monotonic()
        assert claim.wait_until_stable(held, 0.3, renamed_in=True)
        assert time.monotonic() - started >= 0.3 - 0.02
    assert len(sleeps.pauses) >= 2
