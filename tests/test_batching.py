"""Bursts are scored in batches: queued studies fill a forward pass, each is scored once, a bad file fails
alone, a live worker's claim is never taken over, and decoding/encoding overlap the network's passes."""
from __future__ import annotations

import io
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from core import pipeline
from core import repository as repo
from core.db import session_scope
from core.intake.ingest import ingest_file
from core.ml.bundle import load_bundle
from core.models import Status, Study
from core.pipeline import process_studies
from core.settings import Settings
from tests.conftest import fixture_images


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir, device="cpu", mode="fp32")


class Recording:
    """The bundle, with each forward pass counted and timed (and slowed, so overlap has room to show)."""

    def __init__(self, bundle, delay: float = 0.0):
        self._bundle, self._delay = bundle, delay
        self.passes: list[tuple[int, float, float]] = []  # (batch size, start, end)
        self.current = 0  # the number of the pass running now (1, 2, …), 0 between passes

    def __getattr__(self, name):
        return getattr(self._bundle, name)

    def forward(self, x):
        t0 = time.monotonic()
        self.current = len(self.passes) + 1
        time.sleep(self._delay)
        out = self._bundle.forward(x)
        self.passes.append((x.shape[0], t0, time.monotonic()))
        self.current = 0
        return out


def films(n: int) -> list[bytes]:
    """n distinct small real films (the fixtures, each with its own brightness so their bytes differ)."""
    out = []
    for i in range(n):
        with Image.open(fixture_images()[i % 6]) as img:
            arr = np.clip(np.asarray(img.convert("L").resize((160, 160)), dtype=np.int16) + i, 0, 255)
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def queue_burst(settings: Settings, blobs: list[bytes]) -> list[int]:
    sent: list[int] = []
    for i, data in enumerate(blobs):
        (settings.inbox / f"film{i:02d}.png").write_bytes(data)
        ingest_file(settings.inbox / f"film{i:02d}.png", settings=settings, enqueue=sent.append, wait=False)
    return sent


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    s = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", database_url=db_url)
    s.ensure_dirs()
    return s


def test_a_burst_of_n_is_scored_in_ceil_n_over_b_passes_each_study_once(settings, bundle, monkeypatch):
    recording = Recording(bundle)
    ids = queue_burst(settings, films(10))
    outcome, stores = {}, []
    real_store = repo.save_scores

    def store(session, results):  # each call is one pass's transaction (core.pipeline._persist)
        stores.append(len(results))
        return real_store(session, results)
    monkeypatch.setattr(repo, "save_scores", store)
    for sid in ids:  # the tasks, in the order the broker hands them out
        result = process_studies([sid], bundle=recording, settings=settings, worker="w", batch_size=4)
        outcome.update({k: v for k, v in result.items() if v != "skipped"})
    assert [n for n, _, _ in recording.passes] == [4, 4, 2]  # ⌈10/4⌉ passes
    assert stores == [4, 4, 2]  # one write per pass, not one per study
    assert outcome == {sid: "scored" for sid in ids}
    with session_scope(settings.database_url) as s:
        rows = s.scalars(select(Study).order_by(Study.id)).all()
    assert [r.status for r in rows] == [Status.SCORED] * 10
    assert all(r.claim_count == 1 for r in rows)  # one claim each: nobody scored twice
    assert sorted(p.name for p in settings.heatmap_dir.iterdir()) == sorted(f"{r.id}.png" for r in rows)


def test_a_companions_own_delivery_is_settled_by_one_read_without_a_write(settings, bundle):
    # In a burst most messages name studies an earlier pass already scored. Each is skipped after one read: no
    # UPDATE (on SQLite it would wait for the database write lock) and no calibration lookup.
    from sqlalchemy import event

    from core.db import get_engine
    ids = queue_burst(settings, films(3))
    assert process_studies([ids[0]], bundle=bundle, settings=settings, worker="w", batch_size=4) == {
        sid: "scored" for sid in ids}
    statements = []
    engine = get_engine(settings.database_url)
    listener = lambda conn, cur, stmt, params, ctx, many: statements.append(stmt.split()[0].upper())  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        assert process_studies(ids[1:], bundle=bundle, settings=settings, worker="w2", batch_size=4) == {
            sid: "skipped" for sid in ids[1:]}
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert statements == ["SELECT"]


def test_without_a_burst_one_study_is_one_pass(settings, bundle):
    recording = Recording(bundle)
    [sid] = queue_burst(settings, films(1))
    assert process_studies([sid], bundle=recording, settings=settings, worker="w", batch_size=8) == {sid: "scored"}
    assert [n for n, _, _ in recording.passes] == [1]


def test_a_bad_file_in_a_burst_fails_alone(settings, bundle):
    blobs = films(5)
    blobs[2] = blobs[2][: len(blobs[2]) // 3]  # truncated PNG
    ids = queue_burst(settings, blobs)
    outcome = process_studies([ids[0]], bundle=bundle, settings=settings, worker="w", batch_size=4)
    assert outcome == {**{sid: "scored" for sid in ids if sid != ids[2]}, ids[2]: "failed"}
    with session_scope(settings.database_url) as s:
        bad = s.get(Study, ids[2])
        assert bad.status == Status.FAILED and bad.error.startswith("truncated or corrupt")


def test_a_study_claimed_before_is_never_a_companion(settings, bundle):
    ids = queue_burst(settings, films(3))
    with session_scope(settings.database_url) as s:  # a worker died holding the second one
        assert repo.claim_study(s, study_id=ids[1], worker="gone:1", max_claims=3)
        s.get(Study, ids[1]).status = Status.QUEUED
    outcome = process_studies([ids[0]], bundle=bundle, settings=settings, worker="w", batch_size=4)
    assert outcome == {ids[0]: "scored", ids[2]: "scored"}


def test_a_live_workers_claim_is_not_taken_over_but_a_dead_ones_is(settings, bundle):
    [sid] = queue_burst(settings, films(1))
    live = f"{socket.gethostname()}:{os.getpid()}"  # this very process: alive, and it beats
    with session_scope(settings.database_url) as s:
        repo.heartbeat(s, name=live, model_version="m", device="cpu fp32")
        assert repo.claim_study(s, study_id=sid, worker=live)
    assert process_studies([sid], bundle=bundle, settings=settings, worker="other:1", batch_size=1) == {sid: "skipped"}
    with session_scope(settings.database_url) as s:
        assert s.get(Study, sid).worker == live

    dead = f"{socket.gethostname()}:{2 ** 22 + 17}"  # beyond pid_max: no such process on this host
    with session_scope(settings.database_url) as s:
        repo.heartbeat(s, name=dead, model_version="m", device="cpu fp32")  # its heartbeat is still fresh
        s.get(Study, sid).worker = dead
    assert process_studies([sid], bundle=bundle, settings=settings, worker="other:1", batch_size=1) == {sid: "scored"}


def test_decoding_and_heatmap_encoding_overlap_the_forward_passes(settings, bundle, monkeypatch):
    recording = Recording(bundle, delay=0.4)
    decodes, encodes = {}, []
    real_load, real_png = pipeline.load_grayscale, pipeline.cam_png

    def load(path, **kw):
        t0 = time.monotonic()
        img = real_load(path, **kw)
        decodes[path.name] = (t0, time.monotonic(), threading.current_thread().name)
        return img

    def encode(cam):
        # The first pass's encodes wait (up to 10 s) for the second pass to start: a pipeline that held the second
        # pass until they were done would keep them waiting the full time, and none would see it running.
        deadline = time.monotonic() + 10
        while not recording.passes[1:] and recording.current != 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        during_second = recording.current == 2
        data = real_png(cam)
        encodes.append((during_second, time.monotonic(), threading.current_thread().name))
        return data
    monkeypatch.setattr(pipeline, "load_grayscale", load)
    monkeypatch.setattr(pipeline, "cam_png", encode)
    ids = queue_burst(settings, films(8))
    outcome = process_studies([ids[0]], bundle=recording, settings=settings, worker="w", batch_size=4)
    assert set(outcome.values()) == {"scored"} and len(outcome) == 8
    (n1, start1, end1), (n2, start2, end2) = recording.passes
    assert (n1, n2) == (4, 4)
    with session_scope(settings.database_url) as s:
        second = {s.get(Study, sid).stored_path.rsplit("/", 1)[-1] for sid in ids[4:]}
    # The second pass's films were decoded (by the stage threads) before the first pass was over...
    assert all(decodes[name][0] < end1 and decodes[name][2].startswith("stage") for name in second)
    # ...and the first pass's heat-maps were encoded while the second pass ran.
    assert sum(during_second for during_second, _, _ in encodes) >= 1
    assert all(name.startswith("stage") for _, _, name in encodes)


def test_a_task_drains_a_long_queue_one_pass_ahead_leaving_the_rest_to_others(settings, bundle):
    # One delivery scores the whole queue with no gap between tasks, but never holds more than the pass running
    # and the one being decoded: the rest stays queued for the pool's other processes. (Passes already run may
    # still be being stored by a stage thread: those are not counted.)
    ids = queue_burst(settings, films(11))
    held = []

    class Watching(Recording):
        def forward(self, x):
            run = ids[:sum(n for n, _, _ in self.passes)]  # claims go oldest first, so passes take ids in order
            with session_scope(settings.database_url) as s:
                processing = s.scalars(select(Study.id).where(Study.status == Status.PROCESSING)).all()
            held.append(len([sid for sid in processing if sid not in run]))
            return super().forward(x)
    recording = Watching(bundle)
    outcome = process_studies([ids[0]], bundle=recording, settings=settings, worker="w", batch_size=3)
    assert outcome == {sid: "scored" for sid in ids}
    assert [n for n, _, _ in recording.passes] == [3, 3, 3, 2]
    assert max(held) <= 2 * 3 and held[0] <= 2 * 3


def test_an_orderly_failure_gives_back_the_companions_claims_too(settings, bundle):
    ids = queue_burst(settings, films(4))
    with session_scope(settings.database_url) as s:
        assert repo.claim_study(s, study_id=ids[0], worker="w")
        taken = repo.claim_companions(s, worker="w", limit=2, exclude=[ids[0]])
        assert repo.claim_study(s, study_id=ids[3], worker="other")
    assert [sid for sid, _ in taken] == ids[1:3]
    with session_scope(settings.database_url) as s:
        assert repo.release_claims(s, worker="w") == 3
    with session_scope(settings.database_url) as s:
        rows = [s.get(Study, sid) for sid in ids]
        assert [(r.status, r.claim_count) for r in rows] == [(Status.QUEUED, 0)] * 3 + [(Status.PROCESSING, 1)]


def test_companion_claims_take_fresh_studies_oldest_first_and_loaded_objects_read_the_claim(settings):
    ids = queue_burst(settings, films(5))
    with session_scope(settings.database_url) as s:
        s.get(Study, ids[4]).claim_count = 1  # claimed before and given back: never a companion
        s.flush()
        loaded = [s.get(Study, sid) for sid in ids]
        taken = repo.claim_companions(s, worker="w:1", limit=3, exclude=[ids[0]])
        details = repo.claim_details(s, study_ids=[sid for sid, _ in taken])
    assert [sid for sid, _ in taken] == ids[1:4]
    # The session is closed: its objects hold the claim, as an ORM update would have left them.
    assert [(st.status, st.claim_token, st.worker, st.claim_count) for st in loaded[1:4]] == [
        (Status.PROCESSING, token, "w:1", 1) for _, token in taken]
    assert (loaded[0].status, loaded[4].status) == (Status.QUEUED, Status.QUEUED)
    assert details == {st.id: (st.stored_path, "film%02d.png" % i, None) for i, st in enumerate(loaded) if 1 <= i <= 3}
    with session_scope(settings.database_url) as s:
        assert repo.fresh_queued_count(s) == 1  # ids[0]; ids[4] was claimed once
        assert repo.claim_companions(s, worker="w:2", limit=4, exclude=[]) == [(ids[0], s.get(Study, ids[0]).claim_token)]
        assert repo.claim_companions(s, worker="w:2", limit=4, exclude=[]) == []
