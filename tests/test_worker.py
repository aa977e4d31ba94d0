"""A real Celery worker process end to end: Redis + PostgreSQL, the embedded SQLite defaults, and SIGKILL."""
from __future__ import annotations

import io
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import inspect, select

from core.db import get_engine, session_scope
from core.films.imaging import load_grayscale
from core.intake.ingest import ingest_file, requeue_stale
from core.migrate import upgrade
from core.ml.bundle import load_bundle, read_meta
from core.ml.scoring import score_images
from core.models import Calibration, Status, Study, WorkerHeartbeat
from core.settings import Settings
from tests.conftest import fixture_images
from tests.services import WorkerProcess, clean_env, fresh_postgres_database, wait_for
from worker.app import create_celery, make_enqueue, make_enqueue_group

SLOW = 3.0  # seconds a fault-injected task spends inside its claim


@dataclass
class Stack:
    settings: Settings
    tmp: Path

    def __post_init__(self):
        self.enqueue = make_enqueue(create_celery(self.settings))
        self.workers: list[WorkerProcess] = []

    def env(self) -> dict[str, str]:
        s = self.settings
        return clean_env(CHESTAID_DATABASE_URL=s.database_url, CHESTAID_BROKER_URL=s.broker_url,
                         CHESTAID_MODEL_DIR=str(s.model_dir), CHESTAID_DATA_DIR=str(s.data_dir),
                         CHESTAID_INBOX=str(s.inbox), CHESTAID_TASK_QUEUE=s.task_queue,
                         CHESTAID_WORKER_HEARTBEAT_SECONDS=str(s.worker_heartbeat_seconds),
                         CHESTAID_BROKER_VISIBILITY_TIMEOUT=str(s.broker_visibility_timeout),
                         CHESTAID_DEBUG_TASK_DELAY_SECONDS=str(s.debug_task_delay_seconds))

    def start_worker(self, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(env or self.env(), cwd=self.tmp, log_path=self.tmp / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.log()[-4000:]}" for w in self.workers)

    def drop(self, name: str, data: bytes) -> int:
        path = self.settings.inbox / name
        path.write_bytes(data)
        return ingest_file(path, settings=self.settings, enqueue=self.enqueue, wait=False)

    def study(self, study_id: int) -> Study:
        with session_scope(self.settings.database_url) as session:
            return session.get(Study, study_id)

    def wait_status(self, study_id: int, status: str, timeout: float = 120) -> Study:
        return wait_for(lambda: (s := self.study(study_id)).status == status and s, timeout, 0.1,
                        message=lambda: f"study {study_id} {status} (is {self.study(study_id).status})\n{self.logs()}")

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def variant(index: int, tag: int) -> bytes:
    """A fixture film re-encoded as PNG with one pixel nudged: unique bytes, so never a duplicate."""
    with Image.open(fixture_images()[index]) as img:
        pixels = np.asarray(img).copy()
    pixels[0, 0] = tag % 256
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pg_database(postgres_url):
    with fresh_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="module")
def redis_db(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # DB 15 belongs to the tests
    yield client
    client.flushdb()


def redis_stack(tmp: Path, database_url: str, broker_url: str, bundle_dir: Path, **overrides) -> Stack:
    settings = Settings(data_dir=tmp / "var", inbox=tmp / "inbox", database_url=database_url, broker_url=broker_url,
                        model_dir=bundle_dir, task_queue=f"test-{uuid.uuid4().hex[:8]}", worker_heartbeat_seconds=1,
                        stable_seconds=0, **overrides)
    settings.ensure_dirs()
    return Stack(settings, tmp)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pg_database, redis_db, redis_url, bundle_dir):
    stack = redis_stack(tmp_path_factory.mktemp("stack"), pg_database, redis_url, bundle_dir)
    stack.start_worker()
    yield stack
    stack.stop()


@pytest.mark.services
def test_films_are_scored_end_to_end_on_redis_and_postgres(stack, bundle_dir):
    films = fixture_images()
    ids = [stack.drop(f.name, f.read_bytes()) for f in films]
    rows = [stack.wait_status(sid, Status.SCORED) for sid in ids]

    meta = read_meta(bundle_dir)
    # The reference runs in the device and precision the worker measured and chose (its heartbeat says which);
    # bf16 results also depend a little on how films were batched together.
    with session_scope(stack.settings.database_url) as s:
        device, mode = s.get(WorkerHeartbeat, rows[0].worker).device.split()[:2]
    reference = score_images(load_bundle(bundle_dir, device=device, mode=mode), [load_grayscale(f) for f in films])
    for film, row, expected in zip(films, rows, reference):
        assert row.source_name == film.name
        assert row.logit == pytest.approx(expected.logit, abs=1e-3 if mode in ("fp32", "tf32") else 2e-2)
        assert math.isclose(row.score, 1 / (1 + math.exp(-row.logit)), rel_tol=1e-9)  # temperature 1
        assert (row.threshold, row.flagged) == (0.5, row.score >= 0.5)
        assert (row.scored_score, row.scored_threshold, row.scored_flagged) == (row.score, 0.5, row.flagged)
        assert (row.model_version, row.calibration_version) == (meta["version"], "temperature-test0")
        assert row.scored_calibration_version == "temperature-test0"
        assert row.error is None and row.scored_at >= row.received_at
        assert row.worker.split(":")[-1].isdigit()
        assert {"decode_ms", "preprocess_ms", "forward_cam_ms", "forward_cpu_ms", "heatmap_ms"} <= set(row.timings)
        # A thread's CPU lies within the pass's wall time.
        assert 0 < row.timings["forward_cpu_ms"] <= row.timings["forward_cam_ms"] * 1.05
        assert (row.width, row.height) == Image.open(film).size
        with Image.open(stack.settings.data_dir / row.heatmap_path) as heat:
            assert heat.size == (7, 7)  # the CAM grid; upsampled when a page shows it
    with session_scope(stack.settings.database_url) as session:
        [cal] = session.scalars(select(Calibration)).all()
    assert (cal.version, cal.active, cal.model_version, cal.params) == ("temperature-test0", True, meta["version"],
                                                                       {"temperature": 1.0})


@pytest.mark.services
def test_sending_the_task_again_changes_nothing(stack):
    sid = stack.drop("again.png", variant(0, 1))
    first = stack.wait_status(sid, Status.SCORED)
    stack.enqueue(sid)
    stack.enqueue(sid)
    # One pool process takes tasks in order: once a later study is scored, both repeats have run.
    barrier = stack.drop("barrier.png", variant(1, 2))
    stack.wait_status(barrier, Status.SCORED)
    after = stack.study(sid)
    assert (after.status, after.scored_at, after.logit, after.claim_token, after.heatmap_path) == (
        Status.SCORED, first.scored_at, first.logit, first.claim_token, first.heatmap_path)


@pytest.mark.services
def test_one_group_message_from_the_ingester_scores_every_study_it_names(stack):
    held: list[int] = []
    for i in range(3):
        path = stack.settings.inbox / f"group{i}.png"
        path.write_bytes(variant(i, 40 + i))
        ingest_file(path, settings=stack.settings, enqueue=stack.enqueue, wait=False, hand_over=held.append)
    assert len(held) == 3 and all(stack.study(sid).enqueued_at is None for sid in held)  # handed over, not sent
    make_enqueue_group(create_celery(stack.settings))(held)  # the ingester's sender: one score_batch message
    for sid in held:
        row = stack.wait_status(sid, Status.SCORED)
        assert row.heatmap_path == f"heatmaps/{sid}.png" and row.claim_count == 1


@pytest.mark.services
def test_worker_process_sends_heartbeats_with_its_model(stack, bundle_dir):
    def beats():
        with session_scope(stack.settings.database_url) as session:
            return session.scalars(select(WorkerHeartbeat)).all()
    [hb] = wait_for(beats, 60, message=lambda: f"a heartbeat\n{stack.logs()}")
    host, pid = hb.name.rsplit(":", 1)
    assert int(pid) != stack.workers[0].proc.pid  # written by the pool process that holds the model
    assert hb.model_version == read_meta(bundle_dir)["version"]
    assert hb.device.split()[0] in ("cpu", "cuda") and hb.device.split()[1] in ("fp32", "bf16", "tf32", "fp16")
    wait_for(lambda: beats()[0].last_seen > hb.last_seen, 30, message="a newer heartbeat")


@pytest.mark.services
def test_pool_process_killed_mid_task_is_redelivered_and_scored_once(tmp_path, pg_database, redis_db, redis_url,
                                                                   bundle_dir):
    stack = redis_stack(tmp_path, pg_database, redis_url, bundle_dir, debug_task_delay_seconds=SLOW)
    try:
        worker = stack.start_worker()
        sid = stack.drop("killed.png", variant(2, 3))
        claimed = stack.wait_status(sid, Status.PROCESSING)
        victim = int(claimed.worker.rsplit(":", 1)[1])
        assert victim != worker.proc.pid
        os.kill(victim, signal.SIGKILL)  # the pool process dies inside the task, its message unacked

        done = stack.wait_status(sid, Status.SCORED)
        assert worker.alive()
        assert int(done.worker.rsplit(":", 1)[1]) != victim
        assert done.claim_token not in (None, claimed.claim_token)
        assert "WorkerLostError" in worker.log()
        _assert_scored_once(stack, sid, done)
    finally:
        stack.stop()


@pytest.mark.services
def test_whole_worker_killed_then_restarted_scores_the_study_once(tmp_path, pg_database, redis_db, redis_url,
                                                                 bundle_dir):
    stack = redis_stack(tmp_path, pg_database, redis_url, bundle_dir, debug_task_delay_seconds=SLOW,
                        broker_visibility_timeout=2)
    try:
        first = stack.start_worker()
        sid = stack.drop("machine-lost.png", variant(3, 4))
        claimed = stack.wait_status(sid, Status.PROCESSING)
        first.kill()  # SIGKILL to the whole process group: nothing gets to ack, reject or clean up
        assert stack.study(sid).status == Status.PROCESSING
        # Redis hands an unacked message to a new consumer once it is older than the visibility timeout.
        time.sleep(stack.settings.broker_visibility_timeout + 0.5)
        stack.start_worker()
        done = stack.wait_status(sid, Status.SCORED)
        assert done.claim_token not in (None, claimed.claim_token)
        _assert_scored_once(stack, sid, done)
    finally:
        stack.stop()


@pytest.mark.services
def test_stale_sweep_keeps_a_live_workers_claim_and_resends_a_dead_workers(tmp_path, postgres_url, redis_url,
                                                                           bundle_dir):
    with fresh_postgres_database(postgres_url) as db:  # the sweep looks at every study of its database
        stack = redis_stack(tmp_path, db, redis_url, bundle_dir, debug_task_delay_seconds=8,
                            requeue_after_seconds=1, worker_alive_seconds=3)
        sweep = lambda: requeue_stale(settings=stack.settings, enqueue=stack.enqueue)  # noqa: E731
        try:
            first = stack.start_worker()
            sid = stack.drop("held.png", variant(5, 31))
            claimed = stack.wait_status(sid, Status.PROCESSING)

            def beat():  # the claim names the pool process, which beats under that same name
                with session_scope(db) as session:
                    return session.get(WorkerHeartbeat, claimed.worker)
            wait_for(beat, 30, message=lambda: f"a heartbeat from {claimed.worker}\n{stack.logs()}")
            time.sleep(1.5)  # the send and the claim are now older than requeue_after_seconds
            assert sweep() == []  # a live worker's claim is not re-sent, so not stolen
            held = stack.study(sid)
            assert (held.status, held.claim_token, held.enqueue_count) == (Status.PROCESSING, claimed.claim_token, 1)

            first.kill()  # the whole worker is lost; Redis holds its unacked message for 600 s
            assert wait_for(sweep, 30, 0.5, message="the sweep to re-send the dead worker's study") == [sid]
            stack.start_worker()
            done = stack.wait_status(sid, Status.SCORED)
            assert (done.enqueue_count, done.claim_count) == (2, 2)
            assert done.claim_token != claimed.claim_token and done.worker != claimed.worker
        finally:
            stack.stop()


def _assert_scored_once(stack: Stack, sid: int, done: Study) -> None:
    heat = stack.settings.data_dir / done.heatmap_path
    with Image.open(heat) as img:
        assert img.size == (7, 7)  # the CAM grid
    assert [p.name for p in heat.parent.iterdir()] == [heat.name]  # no stray temp files
    # A late duplicate delivery (re-enqueue sweep) must not score it again.
    stack.enqueue(sid)
    barrier = stack.drop(f"barrier-{sid}.png", variant(4, sid))
    stack.wait_status(barrier, Status.SCORED)
    after = stack.study(sid)
    assert (after.status, after.scored_at, after.claim_token, after.logit) == (
        Status.SCORED, done.scored_at, done.claim_token, done.logit)


def test_embedded_defaults_sqlite_and_sqla_broker(tmp_path, bundle_dir):
    # No database or broker configured: SQLite and kombu's SQLAlchemy transport under ./var of the cwd.
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", model_dir=bundle_dir, stable_seconds=0)
    assert settings.database_url == f"sqlite:///{tmp_path / 'var' / 'chestaid.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'var' / 'broker.db'}"
    settings.ensure_dirs()
    upgrade(settings.database_url)
    stack = Stack(settings, tmp_path)
    try:
        stack.start_worker(clean_env(CHESTAID_MODEL_DIR=str(bundle_dir)))
        ids = [stack.drop(f.name, f.read_bytes()) for f in fixture_images()[:2]]
        rows = [stack.wait_status(sid, Status.SCORED) for sid in ids]
        assert [r.model_version for r in rows] == [read_meta(bundle_dir)["version"]] * 2
        assert all((settings.data_dir / r.heatmap_path).is_file() for r in rows)
        assert (tmp_path / "var" / "broker.db").is_file()
    finally:
        stack.stop()
        get_engine(settings.database_url).dispose()


def _processes_with_env(marker: bytes) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_serve_runs_everything_waits_for_a_late_bundle_and_stops_on_ctrl_c(tmp_path, bundle_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model_dir = tmp_path / "models" / "default"
    env = clean_env(CHESTAID_MODEL_DIR=str(model_dir), CHESTAID_WEB_PORT=str(port), CHESTAID_REQUEUE_AFTER_SECONDS="1",
                    CHESTAID_WORKER_HEARTBEAT_SECONDS="1", CHESTAID_STABLE_SECONDS="0.2")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "cli", "serve"], cwd=tmp_path, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", model_dir=model_dir)
    output = lambda: log_path.read_text(errors="replace")  # noqa: E731

    def running(predicate):
        def check():
            assert serve.poll() is None, f"chestaid serve exited early:\n{output()}"
            return predicate()
        return check
    try:
        # Generous: start-up imports torch and migrates; a loaded 2-core machine once needed more than 60 s.
        wait_for(running(lambda: "Chest-Aid is running" in output()), 180, message=output)
        assert f"worklist:  http://127.0.0.1:{port}/" in output()
        assert f"inbox:     {tmp_path / 'inbox'}" in output()
        assert f"WARNING: no model bundle at {model_dir}" in output()

        shutil.copy(fixture_images()[0], tmp_path / "inbox" / "film.jpeg")
        study = lambda: _all_studies(settings)  # noqa: E731
        wait_for(running(lambda: "stay queued: no model loaded" in output()), 90, message=output)
        [row] = study()
        assert (row.status, row.error) == (Status.QUEUED, None)

        shutil.copytree(bundle_dir, model_dir)  # the trained bundle arrives; the sweep re-sends the study
        wait_for(running(lambda: study()[0].status == Status.SCORED), 90, message=output)

        def healthy():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(running(healthy), 60, 0.5, message=output)
        children = _processes_with_env(f"CHESTAID_DATA_DIR={tmp_path / 'var'}".encode())
        assert len(children) >= 4  # web, ingester, worker and its pool process
    finally:
        serve.send_signal(signal.SIGINT)
        code = serve.wait(timeout=90)
    assert code == 0, output()
    assert output().rstrip().endswith("stopped")
    assert _processes_with_env(f"CHESTAID_DATA_DIR={tmp_path / 'var'}".encode()) == []
    get_engine(settings.database_url).dispose()


def _all_studies(settings: Settings) -> list[Study]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Study).order_by(Study.id)))


def test_migrate_command_creates_the_schema_under_the_data_dir(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "migrate"], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    url = f"sqlite:///{tmp_path / 'var' / 'chestaid.db'}"
    assert result.stdout.strip() == f"database at head: {url}"
    engine = get_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"studies", "calibrations", "worker_heartbeats", "alembic_version"} <= tables
    finally:
        engine.dispose()


def test_task_retries_transient_errors_a_bounded_number_of_times_and_fails_only_the_poisoned_study(
        tmp_path, monkeypatch):
    from sqlalchemy.exc import OperationalError

    import worker.tasks as tasks
    from core import repository as repo

    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", task_max_retries=2)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        ids = [repo.create_study(session, source_name=f"{i}.png", sha256=f"{i:064d}", size_bytes=1,
                                 stored_path=f"archive/{i}.png").id for i in range(3)]
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    calls: list[list[int]] = []

    def flaky(study_ids, *, settings):
        calls.append(list(study_ids))
        if len(calls) <= 2:
            raise OperationalError("SELECT 1", {}, Exception("database restarting"))
        return {sid: "scored" for sid in study_ids}
    monkeypatch.setattr(tasks, "run_scoring", flaky)
    assert tasks.score_study.apply(args=[ids[0]]).get() == {ids[0]: "scored"}
    assert calls == [[ids[0]]] * 3  # two transient failures, then success

    calls.clear()

    def down(study_ids, *, settings):
        calls.append(list(study_ids))
        raise OperationalError("SELECT 1", {}, Exception("still down"))
    monkeypatch.setattr(tasks, "run_scoring", down)
    with pytest.raises(OperationalError):
        tasks.score_study.apply(args=[ids[0]]).get()
    assert len(calls) == 1 + settings.task_max_retries  # bounded; the study is left for the stale sweep

    def poisoned(study_ids, *, settings):
        if ids[2] in study_ids:
            raise RuntimeError("tensor shape mismatch")
        return {sid: "scored" for sid in study_ids}
    monkeypatch.setattr(tasks, "run_scoring", poisoned)
    assert tasks.score_batch.apply(args=[ids[1:]]).get() == {ids[1]: "scored", ids[2]: "failed"}
    with session_scope(settings.database_url) as session:
        bad = session.get(Study, ids[2])
        assert (bad.status, bad.error) == (Status.FAILED, "could not be scored: RuntimeError: tensor shape mismatch")
        assert session.get(Study, ids[1]).status == Status.QUEUED  # the fake scorer never touched it
    get_engine(settings.database_url).dispose()


def test_a_failed_release_of_claims_is_logged_and_the_task_still_retries(tmp_path, monkeypatch, caplog):
    from sqlalchemy.exc import OperationalError

    import worker.tasks as tasks
    from core import repository as repo

    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", task_max_retries=1)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    calls: list[list[int]] = []

    def down(study_ids, *, settings):
        calls.append(list(study_ids))
        raise OperationalError("SELECT 1", {}, Exception("database restarting"))

    def release_fails(session, *, worker):
        raise OperationalError("UPDATE", {}, Exception("database restarting"))
    monkeypatch.setattr(tasks, "run_scoring", down)
    monkeypatch.setattr(repo, "release_claims", release_fails)
    with caplog.at_level("WARNING", logger="worker.tasks"), pytest.raises(OperationalError):
        tasks.score_study.apply(args=[7]).get()
    assert calls == [[7], [7]]  # the failed release did not end the task: it retried as usual
    assert "could not release this process's claims" in caplog.text
    get_engine(settings.database_url).dispose()
