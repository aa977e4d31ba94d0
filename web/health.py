"""Readiness checks for /healthz: database, broker, and a live worker with a loaded model."""
from __future__ import annotations

import logging

from kombu import Connection
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from core import repository as repo
from core.settings import Settings

log = logging.getLogger("chestaid.web.health")
BROKER_TIMEOUT_S = 2.0


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def check_db(session: Session) -> str:
    """Returns "ok" when the database answers, else the error."""
    try:
        session.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # any failure is a health answer, never a crash
        session.rollback()
        return _short(exc)


def check_broker(url: str) -> str:
    """Returns "ok" when the Celery broker accepts a connection, else the error.

    kombu's virtual SQLAlchemy transport connects lazily, so for ``sqla+…`` URLs the database
    behind it is asked directly.
    """
    try:
        if url.startswith("sqla+"):
            engine = create_engine(url.removeprefix("sqla+"), poolclass=NullPool)
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            finally:
                engine.dispose()
            return "ok"
        with Connection(url, connect_timeout=BROKER_TIMEOUT_S,
                        transport_options={"socket_timeout": BROKER_TIMEOUT_S}) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_S)
        return "ok"
    except Exception as exc:
        return _short(exc)


def _public(part: str, result: str) -> str:
    # /healthz is public: error texts (hosts, ports, user names) go to the server log, not to the caller.
    if result == "ok":
        return "ok"
    log.warning("health check: %s unavailable: %s", part, result)
    return "unavailable"


def health(session: Session, settings: Settings, *, details: bool = False) -> dict:
    """Collects the checks; "ok" only with a reachable DB and broker and a live worker that loaded a model.

    The public answer is the status alone (load balancers need no more, and worker names, counts and model
    versions tell an outsider what runs here); `details` (signed-in admins) adds each part, the live workers
    and what each reports as its device (precision mode and measured images/s)."""
    db = check_db(session)
    workers = repo.live_workers(session, within_seconds=settings.worker_alive_seconds) if db == "ok" else []
    versions = sorted({w.model_version for w in workers if w.model_version})
    broker = check_broker(settings.broker_url)
    ok = db == "ok" and broker == "ok" and bool(versions)
    result = {"status": "ok" if ok else "unavailable"}
    if not details:
        for part, value in (("database", db), ("broker", broker)):
            _public(part, value)  # the reason still goes to the server log
        return result
    return {**result, "db": _public("database", db), "broker": _public("broker", broker), "workers": len(workers),
            "model_loaded": bool(versions), "model_versions": versions,
            "worker_devices": [{"name": w.name, "model_version": w.model_version, "device": w.device}
                               for w in sorted(workers, key=lambda w: w.name)]}
