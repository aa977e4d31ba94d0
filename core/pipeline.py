"""The scoring pipeline for stored studies: load → preprocess → predict → calibrate → CAM → persist."""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from core import calibrations
from core import repository as repo
from core.bundle import Bundle
from core.calibration import calibrator_from_dict
from core.db import session_scope
from core.dicom import FilmRefused
from core.gradcam import heatmap_png
from core.imaging import ImageRejected, load_grayscale
from core.scoring import score_images
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Claimed:
    study_id: int
    token: str
    stored_path: str


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


def process_studies(study_ids: list[int], *, bundle: Bundle, settings: Settings, worker: str) -> dict[int, str]:
    """Scores a batch of studies end to end; returns {study_id: final status or "skipped"}."""
    outcome: dict[int, str] = {}
    url = settings.database_url
    with session_scope(url) as session:
        claimed, names = [], []
        for sid in study_ids:
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
            study = repo.get_study(session, study_id=sid)
            if token is None or study is None:
                outcome[sid] = "skipped"
            else:
                claimed.append(Claimed(sid, token, study.stored_path))
                names.append(study.source_name)
        cal = calibrations.in_force(session, bundle=bundle)
        calibration = ((calibrator_from_dict({"kind": cal.kind, "params": cal.params}), cal.threshold, cal.version)
                       if cal else (bundle.calibrator, bundle.threshold, bundle.calibration_version))
    _crash_if_marked(settings, names)

    # Load: a file that cannot be decoded fails alone, with its reason, and goes to quarantine; a film the
    # guard refuses (ingest already refuses those; this is the backstop) stays archived, listed as refused.
    images, ok, load_ms = [], [], {}
    for c in claimed:
        t0 = time.perf_counter()
        try:
            # A stored file over max_file_bytes is refused unread (ImageRejected → failed, quarantined).
            images.append(load_grayscale(settings.data_dir / c.stored_path, max_pixels=settings.max_image_pixels,
                                         max_bytes=settings.max_file_bytes))
            ok.append(c)
            load_ms[c.study_id] = (time.perf_counter() - t0) * 1000
        except FilmRefused as exc:
            with session_scope(url) as session:
                repo.mark_refused(session, study_id=c.study_id, token=c.token, reason=str(exc))
            log.info("study %s refused: %s", c.study_id, exc)
            outcome[c.study_id] = "refused"
        except (ImageRejected, FileNotFoundError) as exc:
            reason = str(exc) if isinstance(exc, ImageRejected) else "stored file is missing from the archive"
            with session_scope(url) as session:
                repo.mark_failed(session, study_id=c.study_id, token=c.token, reason=reason,
                                 stored_path=quarantine(settings, c.stored_path))
            log.info("study %s failed: %s", c.study_id, reason)
            outcome[c.study_id] = "failed"

    # Preprocess, predict, calibrate and Grad-CAM, as one batch.
    calibrator, threshold, cal_version = calibration
    results = score_images(bundle, images, calibrator=calibrator, threshold=threshold)

    # Persist: heat-map first (idempotent overwrite), then the row, only if our claim still holds. A film the
    # OOD guard refuses is listed as refused with the reason (kept in the archive, never ranked or flagged),
    # unless an admin chose "score anyway" for that study.
    for c, img, res in zip(ok, images, results):
        if res.refusal is not None:
            with session_scope(url) as session:
                override_by = repo.get_study(session, study_id=c.study_id).guard_override_by
                if override_by is None:
                    refused = repo.mark_refused(session, study_id=c.study_id, token=c.token, reason=res.refusal)
            if override_by is None:
                log.info("study %s refused by the OOD guard: %s", c.study_id, res.refusal)
                outcome[c.study_id] = "refused" if refused else "skipped"
                continue
            log.info("study %s scored despite the OOD guard (%s): override by %s", c.study_id, res.refusal,
                     override_by)
        t0 = time.perf_counter()
        heat_rel = f"heatmaps/{c.study_id}.png"
        atomic_write(settings.data_dir / heat_rel, heatmap_png(res.cam, img.size))
        t1 = time.perf_counter()
        timings = {**res.timings, "decode_ms": load_ms[c.study_id], "heatmap_ms": (t1 - t0) * 1000}
        with session_scope(url) as session:
            stored = repo.save_score(session, study_id=c.study_id, token=c.token, logit=res.logit,
                                     model_version=bundle.version, score=res.score, threshold=threshold,
                                     calibration_version=cal_version, width=img.size[0], height=img.size[1],
                                     heatmap_path=heat_rel, timings={**timings, "db_ms": 0.0})
        timings["db_ms"] = (time.perf_counter() - t1) * 1000
        if stored:
            with session_scope(url) as session:
                repo.get_study(session, study_id=c.study_id).timings = timings
        outcome[c.study_id] = "scored" if stored else "skipped"
    return outcome
