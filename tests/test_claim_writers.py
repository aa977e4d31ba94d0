"""A sender that pauses past the stability wait still holds its file open: ingest must see that."""
from __future__ import annotations

import os
import threading
import time

from core.intake import claim


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
