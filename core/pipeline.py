"""The scoring pipeline for stored studies: load → preprocess → predict → calibrate → CAM → persist."""
from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from core import calibrations
from core import repository as repo
from core.db import session_scope
from core.films.errors import FilmRefused, ImageRejected
from core.films.imaging import load_grayscale
from core.intake import staleness
from core.ml.bundle import Bundle
from core.ml.calibration import calibrator_from_dict
from core.ml.gradcam import cam_png
from core.ml.scoring import score_images
from core.models import utcnow
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Claimed:
    study_id: int
    token: str
    stored_path: str
    source_name: str = ""
    override_by: str | None = None  # an admin's "score anyway": the OOD guard does not refuse this study


def atomic_write(path: Path, data: bytes) -> None:
    """Writes a file via a temp name and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def quarantine(settings: Settings, stored_path: str) -> str:
    """Moves a rejected file from the archive into the quarantine folder; returns its new relative path."""
    src = settings.data_dir / stored_path
    dest = settings.quarantine_dir / Path(stored_path).name
    if src.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dest)
    return dest.relative_to(settings.data_dir).as_posix() if dest.exists() else stored_path


def _crash_if_marked(settings: Settings, names: list[str]) -> None:
    """Fault injection (tests only, `debug_crash_marker`): ends this process at once, with its claims committed
    and nothing cleaned up, when it is about to load a marked film, as a crashing decoder would."""
    marker = settings.debug_crash_marker
    if marker and any(marker in name for name in names):
        log.error("debug_crash_marker %r: process %s exits while loading %s", marker, os.getpid(), names)
        logging.shutdown()
        os._exit(70)


# A task goes on claiming fresh queued studies, pass after pass, for at most this long: a burst is scored with no
# gap between tasks, yet each task ends in good time (a recalibration applies from the next task on).
DRAIN_SECONDS = 30.0


def process_studies(study_ids: list[int], *, bundle: Bundle, settings: Settings, worker: str,
                    batch_size: int = 0) -> dict[int, str]:
    """Scores studies end to end; returns {study_id: final status or "skipped"}.

    With `batch_size` > 0 a burst fills the batch: queued studies beyond those delivered are claimed too, one
    forward pass ahead, for as long as fresh ones are queued (up to DRAIN_SECONDS), and the stages overlap — the
    next pass's films are decoded and the last pass's heat-maps encoded and stored by a thread pool while the
    network runs. Claiming a single pass ahead, not the whole queue, leaves the rest to the other processes; once
    less than a pass is left beyond the last claim, the next is claimed only when this process is free.
    """
    outcome: dict[int, str] = {}
    claimed, calibration, burst = _claim(study_ids, bundle=bundle, settings=settings, worker=worker,
                                         room=batch_size, outcome=outcome)
    chunk = batch_size or max(1, len(claimed))
    deadline = time.monotonic() + DRAIN_SECONDS
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="stage") as pool:
        def start(more: list[Claimed]) -> list[tuple[Claimed, object]]:
            _crash_if_marked(settings, [c.source_name for c in more])
            return [(c, pool.submit(_load, c, settings)) for c in more]  # decoding starts at once
        def claim_next() -> tuple[list[tuple[Claimed, object]], bool]:
            more, left = _companions(settings=settings, worker=worker, limit=batch_size)
            return start(more), left >= batch_size

        queue = start(claimed)
        persisting, following, ahead = [], None, True
        while queue:
            this, queue = queue[:chunk], queue[chunk:]
            drain = burst and not queue and time.monotonic() < deadline
            if drain and ahead:
                # The next pass is claimed by a stage thread while this one runs: on SQLite the claim may wait
                # for the ingester's write lock, and the network need not wait with it.
                following = pool.submit(claim_next)
            ready = []
            for c, load in this:
                image, decode_ms, failure = load.result()
                if failure is None:
                    ready.append((c, image, decode_ms))
                else:
                    outcome[c.study_id] = failure
            results = score_images(bundle, [img for _, img, _ in ready], calibrator=calibration[0],
                                   threshold=calibration[1], bypass_guard=[c.override_by is not None for c, _, _ in ready])
            if ready:
                persisting.append(pool.submit(_persist, [(c, img, res, decode_ms) for (c, img, decode_ms), res
                                                         in zip(ready, results)],
                                              bundle=bundle, settings=settings, calibration=calibration))
            if following is not None:
                (queue, ahead), following = following.result(), None
            elif drain:
                # The burst's last films are claimed only once this pass is over, so that they go to whichever
                # pool process is free first: claimed ahead, they could keep this one busy a pass after the
                # others ran out of work (measured: a tail of 1.3 s in a 16 s burst).
                queue, ahead = claim_next()
        for done in persisting:
            outcome.update(done.result())
    return outcome


def _claim(study_ids: list[int], *, bundle: Bundle, settings: Settings, worker: str, room: int,
           outcome: dict[int, str]) -> tuple[list[Claimed], tuple | None, bool]:
    """Claims the delivered studies (and, when `room` allows, fresh queued companions) in one transaction;
    returns them, the calibration in force (None when nothing was claimed) and whether this is a fresh burst
    that may go on claiming companions. Poison files and studies a live worker holds are settled here."""
    claimed: list[Claimed] = []
    with session_scope(settings.database_url) as session:
        # In a burst most deliveries are of companions another pass already scored: one read settles them,
        # with no write (on SQLite a write would queue behind the ingester's for the database lock).
        unfinished = repo.unfinished_claim_counts(session, study_ids=study_ids)
        for sid in study_ids:
            if sid not in unfinished:
                outcome[sid] = "skipped"
                continue
            holder = staleness.holder_is_alive(session, study_id=sid, me=worker, now=utcnow(),
                                               worker_alive_seconds=settings.worker_alive_seconds,
                                               claim_timeout_seconds=settings.claim_timeout_seconds)
            if holder is not None:  # a second delivery of a study a live worker is scoring: leave it be
                outcome[sid] = "skipped"
                continue
            token = repo.claim_study(session, study_id=sid, worker=worker, max_claims=settings.max_claims)
            if token is None and (poison := repo.exhausted_claims(session, study_id=sid,
                                                                  max_claims=settings.max_claims)):
                # Every claim so far ended with its worker process dead (decoder crash, OOM kill): stop here,
                # or each redelivery kills one more worker.
                reason = f"worker died {poison.claim_count} times while processing this file"
                repo.mark_failed(session, study_id=sid, reason=reason,
                                 stored_path=quarantine(settings, poison.stored_path))
                log.error("study %s failed: %s", sid, reason)
                outcome[sid] = "failed"
                continue
            if token is None:
                outcome[sid] = "skipped"
            else:
                claimed.append(Claimed(sid, token, ""))
        if not claimed:
            return [], None, False
        # A burst: fill the pass with fresh queued studies; a study already claimed before is never a
        # companion (it may be a poison file), and a delivered study that is is scored alone (worker.tasks).
        burst = room > 0 and all(unfinished[c.study_id] == 0 for c in claimed)  # claim counts before this claim
        if burst and room > len(claimed):
            claimed += _take_companions(session, worker=worker, limit=room - len(claimed),
                                        exclude=[c.study_id for c in claimed])
        _describe(session, claimed)
        cal = calibrations.in_force(session, bundle=bundle)
        calibration = ((calibrator_from_dict({"kind": cal.kind, "params": cal.params}), cal.threshold, cal.version)
                       if cal else (bundle.calibrator, bundle.threshold, bundle.calibration_version))
    return claimed, calibration, burst


def _companions(*, settings: Settings, worker: str, limit: int) -> tuple[list[Claimed], int]:
    """Claims up to `limit` more fresh queued studies for the next pass of a burst (none: the burst is over);
    returns them and how many fresh ones are still queued after them."""
    with session_scope(settings.database_url) as session:
        claimed = _take_companions(session, worker=worker, limit=limit, exclude=[])
        _describe(session, claimed)
        left = repo.fresh_queued_count(session) if claimed else 0
    return claimed, left


def _take_companions(session, *, worker: str, limit: int, exclude: list[int]) -> list[Claimed]:
    return [Claimed(sid, token, "") for sid, token in repo.claim_companions(
        session, worker=worker, limit=limit, exclude=exclude)]


def _describe(session, claimed: list[Claimed]) -> None:
    """Fills in each claimed study's stored file, name and guard override from its row."""
    details = repo.claim_details(session, study_ids=[c.study_id for c in claimed])
    for c in claimed:
        c.stored_path, c.source_name, c.override_by = details[c.study_id]


def _load(c: Claimed, settings: Settings) -> tuple[object, float, str | None]:
    """Decodes one claimed film: (image, decode ms, None), or records why not and returns its final status.

    A file that cannot be decoded fails alone, with its reason, and goes to quarantine; a film the DICOM guard
    refuses (ingest already refuses those; this is the backstop) stays archived, listed as refused.
    """
    t0 = time.perf_counter()
    try:
        # A stored file over max_file_bytes is refused unread (ImageRejected → failed, quarantined).
        image = load_grayscale(settings.data_dir / c.stored_path, max_pixels=settings.max_image_pixels,
                               max_bytes=settings.max_file_bytes)
        return image, (time.perf_counter() - t0) * 1000, None
    except FilmRefused as exc:
        with session_scope(settings.database_url) as session:
            repo.mark_refused(session, study_id=c.study_id, token=c.token, reason=str(exc))
        log.info("study %s refused: %s", c.study_id, exc)
        return None, 0.0, "refused"
    except (ImageRejected, FileNotFoundError) as exc:
        reason = str(exc) if isinstance(exc, ImageRejected) else "stored file is missing from the archive"
        with session_scope(settings.database_url) as session:
            repo.mark_failed(session, study_id=c.study_id, token=c.token, reason=reason,
                             stored_path=quarantine(settings, c.stored_path))
        log.info("study %s failed: %s", c.study_id, reason)
        return None, 0.0, "failed"


def _persist(scored: list[tuple[Claimed, object, object, float]], *, bundle: Bundle, settings: Settings,
             calibration: tuple) -> dict[int, str]:
    """Stores a forward pass's results in one transaction, each only if its claim still holds: the heat-maps
    first (idempotent overwrites), then the rows. A film the OOD guard refuses is listed as refused with the
    reason (kept in the archive, never ranked or flagged), unless an admin chose "score anyway" for it.
    Returns {study_id: "scored" | "refused" | "skipped"}."""
    refusals, results = [], []
    _, threshold, cal_version = calibration
    for c, img, res, decode_ms in scored:
        if res.refusal is not None:
            refusals.append((c, res.refusal))
            continue
        if c.override_by is not None:
            log.info("study %s scored despite the OOD guard: override by %s", c.study_id, c.override_by)
        t0 = time.perf_counter()
        heat_rel = f"heatmaps/{c.study_id}.png"
        atomic_write(settings.data_dir / heat_rel, cam_png(res.cam))
        timings = {**res.timings, "decode_ms": decode_ms, "heatmap_ms": (time.perf_counter() - t0) * 1000}
        results.append(dict(study_id=c.study_id, token=c.token, logit=res.logit, model_version=bundle.version,
                            score=res.score, threshold=threshold, calibration_version=cal_version,
                            width=img.size[0], height=img.size[1], heatmap_path=heat_rel, timings=timings))
    with session_scope(settings.database_url) as session:
        refused = {c.study_id for c, reason in refusals
                   if repo.mark_refused(session, study_id=c.study_id, token=c.token, reason=reason)}
        stored = set(repo.save_scores(session, results))
    for c, reason in refusals:
        log.info("study %s refused by the OOD guard: %s", c.study_id, reason)
    for sid in sorted(stored):  # logged as each pass lands: a worker killed mid-burst has still said what it stored
        log.info("study %s stored as scored", sid)
    return {**{c.study_id: "refused" if c.study_id in refused else "skipped" for c, _ in refusals},
            **{r["study_id"]: "scored" if r["study_id"] in stored else "skipped" for r in results}}
