"""The worklist at a year of studies: seeds N realistic studies and prints p50/p95 per endpoint.

    .venv/bin/python bench/scale.py --studies 10000 100000 --db sqlite postgres

Seeds 85% read, 10% unread, 2% failed, the rest queued/refused/duplicates, 40% DICOM studies with 1–3
images, received over a year, straight into a fresh migrated database (bulk inserts, then the worklist rows
are rebuilt as a calibration activation would). Then runs one `chestaid web` process against it and times
each endpoint over HTTP from a signed-in session (API calls with a bearer token). Not part of the tests.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import auth, worklist_rows  # noqa: E402
from core.db import get_engine, session_scope  # noqa: E402
from core.migrate import upgrade  # noqa: E402
from core.models import Status, Study  # noqa: E402

PG_BASE = os.environ.get("CHESTAID_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PASSWORD = "bench password, not a secret"
NOW = dt.datetime.now(dt.timezone.utc)


def _study(i: int, rng: random.Random, *, status: str, finding: str | None, dicom: tuple[str, str] | None,
           received: dt.datetime) -> dict:
    score = rng.random() ** 2  # most films look normal
    scored = status == Status.SCORED
    row = {"source_name": f"film-{i:07d}.{'dcm' if dicom else 'jpeg'}", "sha256": uuid.uuid4().hex * 2,
           "size_bytes": 1000, "stored_path": f"archive/{i}", "status": status, "received_at": received,
           "enqueue_count": 1, "claim_count": 0,
           "score": score if scored else None, "logit": 0.0 if scored else None, "threshold": 0.5 if scored else None,
           "flagged": score >= 0.5 if scored else None, "scored_flagged": score >= 0.5 if scored else None,
           "scored_at": received if scored else None, "finding": finding,
           "feedback_at": received + dt.timedelta(minutes=rng.randint(5, 600)) if finding else None,
           "outcome": None, "error": "unreadable" if status == Status.FAILED else None,
           "study_instance_uid": None, "patient_id": None, "accession_number": None, "modality": None}
    if dicom:
        row.update(study_instance_uid=dicom[0], patient_id=dicom[1], accession_number=f"ACC{dicom[0][-7:]}",
                   modality="DX")
    return row


def seed(url: str, n: int, *, seed_value: int = 9) -> dict[str, int]:
    """Adds about n studies with the issue's mix to a migrated database and rebuilds the worklist rows."""
    rng = random.Random(seed_value)
    rows, i = [], 0
    while i < n:
        roll = rng.random()
        status, finding = ((Status.SCORED, rng.choice(("normal", "pneumonia"))) if roll < 0.85 else
                           (Status.SCORED, None) if roll < 0.95 else (Status.FAILED, None) if roll < 0.97 else
                           (rng.choice((Status.QUEUED, Status.REFUSED, Status.DUPLICATE)), None))
        # Unread films are this week's; read ones span the year.
        span = 7 * 24 * 60 if finding is None and status == Status.SCORED else 365 * 24 * 60
        received = NOW - dt.timedelta(minutes=rng.uniform(0, span))
        if rng.random() < 0.4:
            uid, patient = f"1.2.826.0.1.{seed_value}.{i}", f"P{rng.randint(0, n // 3):07d}"
            for _ in range(rng.randint(1, 3)):
                rows.append(_study(i, rng, status=status, finding=finding, dicom=(uid, patient), received=received))
                i += 1
        else:
            rows.append(_study(i, rng, status=status, finding=finding, dicom=None, received=received))
            i += 1
    with session_scope(url) as s:
        for start in range(0, len(rows), 5000):
            s.execute(insert(Study), rows[start:start + 5000])
        worklist_rows.rebuild(s)
    if url.startswith("postgresql"):
        with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("VACUUM ANALYZE"))
    else:
        with get_engine(url).begin() as c:
            c.execute(text("ANALYZE"))
    return {"studies": len(rows)}


def _database(kind: str, root: Path, n: int) -> str:
    if kind == "sqlite":
        return f"sqlite:///{root / 'chestaid.db'}"
    name = f"chestaid_bench_{n}_{uuid.uuid4().hex[:8]}"
    with create_engine(PG_BASE, isolation_level="AUTOCOMMIT").connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    return PG_BASE.rsplit("/", 1)[0] + f"/{name}"


def _drop(url: str) -> None:
    if url.startswith("postgresql"):
        get_engine(url).dispose()
        with create_engine(PG_BASE, isolation_level="AUTOCOMMIT").connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))


def _client(base: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=60)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post("/login", data={"name": "bench", "password": PASSWORD, "csrf_token": token})
    assert r.status_code in (200, 303), r.text
    return client


def measure(base: str, *, api_token: str, study_id: int, accession: str, repeat: int) -> dict[str, tuple]:
    """Times each endpoint `repeat` times after a warm-up; returns {name: (p50 ms, p95 ms, last status)}."""
    client = _client(base)
    bearer = {"Authorization": f"Bearer {api_token}"}
    etag = client.get("/fragments/worklist").headers.get("etag", "")
    endpoints = {
        "/ (worklist page)": ("/", {}), "/fragments/worklist (poll)": ("/fragments/worklist", {}),
        "idle poll (If-None-Match)": ("/fragments/worklist", {"If-None-Match": etag}),
        "/read (read view)": ("/read", {}), f"/studies/{study_id}": (f"/studies/{study_id}", {}),
        "/api/studies (default page)": ("/api/studies", bearer),
        "/api/studies?section=read (page 2)": ("/api/studies?section=read", bearer),
        "/api/studies?q= (search)": (f"/api/studies?q={accession}", bearer),
    }
    link = client.get("/api/studies?section=read", headers=bearer).headers.get("link", "")
    endpoints["/api/studies?section=read (page 2)"] = (re.search(r"<([^>]+)>", link).group(1).replace(base, ""),
                                                       bearer)
    out = {}
    for name, (path, headers) in endpoints.items():
        for _ in range(3):
            client.get(path, headers=headers)
        if "If-None-Match" in headers:  # as the page does: the version of what it last received
            headers = {"If-None-Match": client.get(path).headers.get("etag", "")}
        times, statuses = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            r = client.get(path, headers=headers)
            times.append((time.perf_counter() - start) * 1000)
            statuses.append(r.status_code)
            if "If-None-Match" in headers and r.status_code == 200:  # a row crossed the wait limit meanwhile
                headers = {"If-None-Match": r.headers.get("etag", "")}
        times.sort()
        status = "/".join(f"{statuses.count(c)}x{c}" for c in sorted(set(statuses)))
        out[name] = (statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))], status)
    return out


def run(kind: str, n: int, *, repeat: int, port: int) -> dict[str, tuple]:
    """Seeds one database, serves it with `chestaid web` and measures it."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = _database(kind, root, n)
        try:
            upgrade(url)
            seed(url, n)
            with session_scope(url) as s:
                auth.create_user(s, name="bench", role="doctor", password=PASSWORD, actor="bench")
                token = auth.create_token(s, user_name="bench", label="bench", actor="bench")
                study_id, accession = s.execute(text(
                    "SELECT id, accession_number FROM studies WHERE accession_number IS NOT NULL "
                    "AND status = 'scored' ORDER BY id LIMIT 1")).one()
            get_engine(url).dispose()
            env = {**os.environ, "CHESTAID_DATABASE_URL": url, "CHESTAID_DATA_DIR": str(root / "data"),
                   "CHESTAID_INBOX": str(root / "inbox"), "CHESTAID_BROKER_URL": f"sqla+sqlite:///{root / 'b.db'}"}
            web = subprocess.Popen([sys.executable, "-m", "cli", "web", "--port", str(port)], env=env,
                                   cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            try:
                base = f"http://127.0.0.1:{port}"
                for _ in range(200):
                    try:
                        httpx.get(base + "/healthz", timeout=1)
                        break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                return measure(base, api_token=token, study_id=study_id, accession=accession, repeat=repeat)
            finally:
                web.terminate()
                web.wait(timeout=10)
        finally:
            _drop(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--db", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"])
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    results = {(kind, n): run(kind, n, repeat=args.repeat, port=args.port) for kind in args.db for n in args.studies}
    names = list(next(iter(results.values())))
    print(f"{'endpoint':38s}" + "".join(f"{k} {n // 1000}k p50/p95 ms".rjust(34) for k, n in results))
    for name in names:
        cells = "".join(f"{results[k][name][0]:7.1f} / {results[k][name][1]:6.1f} ({results[k][name][2]})".rjust(34)
                        for k in results)
        print(f"{name:38s}{cells}")


if __name__ == "__main__":
    main()
