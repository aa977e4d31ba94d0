"""Celery tasks: thin adapters from study ids to core.pipeline, with the model loaded once per process."""
from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time

import torch
from celery.signals import worker_init, worker_process_init, worker_ready
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from core import calibrations
from core import repository as repo
from core.db import get_engine, session_scope
from core.ml import precision, threads
from core.ml.bundle import META_FILE, Bundle, load_bundle
from core.pipeline import process_studies
from core.settings import Settings, get_settings
from worker.app import SCORE_BATCH, SCORE_STUDY, celery_app
from worker.pool_batch import PoolBatch

log = logging.getLogger(__name__)

# Worth retrying: the database or a file system that is briefly away. Anything else is not transient.
TRANSIENT = (SQLAlchemyError, OSError)


def worker_name() -> str:
    """Names this process for claims and heartbeats."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Model:
    """The bundle of this worker process, loaded lazily after fork, its burst batch size and its heartbeat."""

    def __init__(self):
        self.bundle: Bundle | None = None
        self.batch_size = 1
        self.lock = threading.Lock()
        self.last_error: str | None = None
        self.heartbeat: threading.Thread | None = None

    def get(self, settings: Settings) -> Bundle | None:
        """Returns the loaded bundle, loading it now if needed; None (logged once per cause) if it cannot."""
        with self.lock:
            if self.bundle is None:
                bundle = self._load(settings)
                if bundle is None:
                    return None
                _register_calibration(settings, bundle)
                self.bundle, self.last_error = bundle, None
                self._start_heartbeat(settings, bundle)
            return self.bundle

    def _load(self, settings: Settings) -> Bundle | None:
        """Loads the bundle in the configured (or measured) precision and sizes bursts for this device."""
        try:
            bundle = load_bundle(settings.model_dir, mode=settings.precision)
            self.batch_size = settings.score_batch_size or _burst_batch(bundle)
            precision.warm_up(bundle.net, bundle.device, bundle.mode, self.batch_size, size=bundle.input_size)
        except Exception as exc:
            message = (f"no usable model bundle at {settings.model_dir} ({exc}); studies stay queued "
                       "and are re-enqueued once a bundle exists (set CHESTAID_MODEL_DIR)")
            if message != self.last_error:
                log.error(message)
            self.last_error = message
            return None
        log.info("loaded model %s (calibration %s) on %s, bursts in batches of %d, in process %s", bundle.version,
                 bundle.calibration_version, device_label(bundle), self.batch_size, os.getpid())
        return bundle

    def _start_heartbeat(self, settings: Settings, bundle: Bundle) -> None:
        """Starts the thread that tells the ingester's sweep and the status strip this process is alive."""
        self.heartbeat = threading.Thread(target=_heartbeat_loop, args=(settings, bundle),
                                          name="heartbeat", daemon=True)
        self.heartbeat.start()


MODEL = _Model()


def device_label(bundle: Bundle) -> str:
    """The device, the precision chosen for it, the probe's images/s and, on a CPU, this process's torch threads
    and burst batch, e.g. "cpu fp32 9 img/s, 1 thread, batch 4"."""
    n = torch.get_num_threads()
    share = f", {n} thread{'s' if n > 1 else ''}" if bundle.device.type == "cpu" else ""
    return f"{bundle.choice.label}{share}, batch {MODEL.batch_size}"


def _register_calibration(settings: Settings, bundle: Bundle) -> None:
    for attempt in range(2):
        try:
            with session_scope(settings.database_url) as session:
                calibrations.ensure_bundle(session, bundle_meta=bundle.meta, source=str(settings.model_dir),
                                           actor=f"worker:{worker_name()}")
            return
        except IntegrityError:
            if attempt:  # two processes registered the same version at once; the second look finds it
                raise


def _heartbeat_loop(settings: Settings, bundle: Bundle) -> None:
    name, device = worker_name(), device_label(bundle)
    while True:
        try:
            with session_scope(settings.database_url) as session:
                repo.heartbeat(session, name=name, model_version=bundle.version, device=device)
        except Exception as exc:
            log.warning("heartbeat failed: %s", exc)
        time.sleep(settings.worker_heartbeat_seconds)


# The size of this worker's pool and, for a pool of several processes, their shared batch agreement; both made
# in the parent before it forks.
POOL: dict = {"processes": 1, "batch": None}


@worker_init.connect
def _remember_pool_size(sender=None, **_) -> None:
    POOL["processes"] = int(getattr(sender, "concurrency", None) or 1)
    if POOL["processes"] > 1:
        candidates = [b for sizes in precision.BATCH_CANDIDATES.values() for b in sizes]
        POOL["batch"] = PoolBatch(POOL["processes"], candidates)


def _burst_batch(bundle: Bundle) -> int:
    """The burst batch size: agreed by the pool's processes from all their probes, or this process's own."""
    agreement: PoolBatch | None = POOL["batch"]
    if agreement is None:
        return precision.best_batch(bundle.net, bundle.device, bundle.mode, size=bundle.input_size)
    return agreement.agree(lambda: precision.batch_figures(bundle.net, bundle.device, bundle.mode,
                                                           size=bundle.input_size), precision.pick_batch)


@worker_process_init.connect
def _load_in_child(**_) -> None:
    """Loads the model in each pool process after fork (the parent never touches torch devices), with the
    machine's cores shared out among the pool's processes as torch threads."""
    settings = get_settings()
    torch.set_num_threads(threads.threads_per_process(POOL["processes"]))
    get_engine(settings.database_url).dispose(close=False)  # never share connections across fork
    try:
        MODEL.get(settings)
    except Exception:
        log.exception("model loading failed; tasks will retry it")


@worker_ready.connect
def _warn_missing_bundle(**_) -> None:
    settings = get_settings()
    if not (settings.model_dir / META_FILE).is_file():
        log.error("no model bundle at %s: this worker cannot score until one exists (studies stay queued)",
                  settings.model_dir)


class _SlowBundle:
    """Fault injection for tests: the delay falls inside the claimed (processing) part of a task."""

    def __init__(self, bundle: Bundle, delay: float):
        self._bundle, self._delay = bundle, delay

    def __getattr__(self, name):
        return getattr(self._bundle, name)

    def forward(self, x):
        time.sleep(self._delay)
        return self._bundle.forward(x)


def run_scoring(study_ids: list[int], *, settings: Settings | None = None) -> dict[int, str]:
    """Scores studies in one batch in this process; 'waiting-for-model' when no bundle is loaded."""
    settings = settings or get_settings()
    bundle = MODEL.get(settings)
    if bundle is None:
        log.error("studies %s stay queued: no model loaded", study_ids)
        return {sid: "waiting-for-model" for sid in study_ids}
    if settings.debug_task_delay_seconds > 0:
        bundle = _SlowBundle(bundle, settings.debug_task_delay_seconds)
    return process_studies(list(study_ids), bundle=bundle, settings=settings, worker=worker_name(),
                           batch_size=MODEL.batch_size)


def _one_at_a_time(study_ids: list[int], *, settings: Settings) -> list[int] | None:
    """For a batch in which some study was claimed before without a result (a redelivery after its worker
    died): the unfinished ids to score one per pass, fewest claims first, so a poison film kills no more
    batch-mates and its innocent neighbours are scored before it. None when the batch is fresh."""
    if len(study_ids) < 2:
        return None
    try:
        with session_scope(settings.database_url) as session:
            counts = repo.unfinished_claim_counts(session, study_ids=study_ids)
    except TRANSIENT:
        return None  # cannot tell; the batch pass itself will meet the outage and retry
    if not any(counts.values()):
        return None
    return sorted(counts, key=lambda sid: (counts[sid], study_ids.index(sid)))


def _release_claims(*, settings: Settings) -> None:
    """Gives back this process's claims after an exception (best effort), so they count as no death: on the
    delivered studies and on the companions the task had claimed for its passes (a pool process runs one task
    at a time, so every claim it holds without a result is this task's)."""
    try:
        with session_scope(settings.database_url) as session:
            repo.release_claims(session, worker=worker_name())
    except Exception as exc:
        log.warning("could not release this process's claims (%s); a retry counts them", exc)


def _run(task, study_ids: list[int]) -> dict[int, str]:
    settings = get_settings()
    order = _one_at_a_time(study_ids, settings=settings)
    if order is not None:
        log.warning("batch %s was delivered before and not finished: scoring %s one at a time", study_ids, order)
        outcome = {sid: "skipped" for sid in study_ids}  # finished meanwhile
        for sid in order:
            outcome.update(_run(task, [sid]))  # each pass logs its own "finished" line
        return outcome
    try:
        outcome = run_scoring(study_ids, settings=settings)
    except TRANSIENT as exc:
        _release_claims(settings=settings)
        retries = task.request.retries
        countdown = min(60.0, 2.0 ** retries) * (0.5 + random.random())
        log.warning("transient error scoring %s (%s); retry %d/%d in %.1fs", study_ids, exc, retries + 1,
                    settings.task_max_retries, countdown)
        # After the last retry the study is left for the ingester's stale re-enqueue sweep.
        raise task.retry(exc=exc, countdown=countdown, max_retries=settings.task_max_retries)
    except Exception as exc:
        _release_claims(settings=settings)
        if len(study_ids) > 1:  # one poisoned study must not fail the rest of a batch
            outcome = {}
            for sid in study_ids:
                outcome.update(_run(task, [sid]))
            return outcome
        log.exception("study %s could not be scored", study_ids[0])
        with session_scope(settings.database_url) as session:
            repo.mark_failed(session, study_id=study_ids[0],
                             reason=f"could not be scored: {type(exc).__name__}: {exc}")
        return {study_ids[0]: "failed"}
    log.info("finished %s", outcome)
    return outcome


@celery_app.task(bind=True, name=SCORE_STUDY)
def score_study(self, study_id: int) -> dict[int, str]:
    """Scores one study (idempotent: a finished study is skipped)."""
    return _run(self, [int(study_id)])


@celery_app.task(bind=True, name=SCORE_BATCH)
def score_batch(self, study_ids: list[int]) -> dict[int, str]:
    """Scores several studies in one forward pass."""
    return _run(self, [int(s) for s in study_ids])
