"""The storm's service stack as real processes it can kill and restart: the `chestaid ingest` watcher, Celery
workers (tests.services.WorkerProcess), a private redis-server on a free port, and `chestaid web` for /healthz.

Two stacks: "embedded" (SQLite + kombu's SQLAlchemy broker on SQLite) and "redis" (a fresh Postgres database
+ the private Redis). The shared Redis on 6379 is never touched: the storm restarts its own.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from sqlalchemy import func, select

from core.db import get_engine, session_scope
from core.migrate import upgrade
from core.models import WorkerHeartbeat
from tests.services import WorkerProcess, clean_env, fresh_postgres_database, wait_for

CHESTAID = str(Path(sys.executable).parent / "chestaid")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server without persistence on its own port: a restart loses every queued message."""

    def __init__(self, work: Path):
        self.work, self.port = work, free_port()
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "redis.log", "ab")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no", "--dir", str(self.work)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), 20, 0.1, message=f"private redis on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_seconds: float = 1.0) -> None:
        """SIGKILLs the server and starts a fresh one on the same port after `down_seconds`."""
        self.kill()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


class StormStack:
    """Database, broker, ingester and workers for one storm; a context manager that stops them all."""

    def __init__(self, kind: str, work: Path, *, bundle_dir: Path, postgres_url: str | None = None,
                 stable_seconds: float = 0.4, requeue_after_seconds: int = 10, poison_marker: str,
                 max_claims: int = 3, visibility_timeout: int = 30):
        if kind not in ("embedded", "redis"):
            raise ValueError(f"unknown stack {kind!r} (embedded or redis)")
        if kind == "redis" and not postgres_url:
            raise ValueError("the redis stack needs a Postgres base URL")
        self.kind, self.work, self.bundle_dir, self.postgres_url = kind, work, bundle_dir, postgres_url
        self.stable_seconds, self.requeue_after = stable_seconds, requeue_after_seconds
        self.poison_marker, self.max_claims, self.visibility_timeout = poison_marker, max_claims, visibility_timeout
        self.data_dir, self.inbox = work / "var", work / "inbox"
        self.redis: PrivateRedis | None = None
        self.workers: list[WorkerProcess] = []
        self.killed: list[WorkerProcess] = []
        self.ingester: subprocess.Popen | None = None
        self.ingester_starts = 0
        self._exit = ExitStack()

    def __enter__(self) -> "StormStack":
        try:
            self.data_dir.mkdir(parents=True)
            self.inbox.mkdir()
            if self.kind == "embedded":
                self.database_url = f"sqlite:///{self.data_dir / 'chestaid.db'}"
                self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
                upgrade(self.database_url)
            else:
                self.database_url = self._exit.enter_context(fresh_postgres_database(self.postgres_url))
                self.redis = PrivateRedis(self.work / "redis")
                self.redis.start()
                self._exit.callback(self.redis.kill)
                self.broker_url = self.redis.url
            self._exit.callback(lambda: get_engine(self.database_url).dispose())
            self._exit.callback(self._stop_processes)
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()

    def env(self) -> dict[str, str]:
        """The environment every service process of this stack runs with (settings pinned, nothing inherited)."""
        return clean_env(
            CHESTAID_DATA_DIR=str(self.data_dir), CHESTAID_INBOX=str(self.inbox),
            CHESTAID_DATABASE_URL=self.database_url, CHESTAID_BROKER_URL=self.broker_url,
            CHESTAID_MODEL_DIR=str(self.bundle_dir), CHESTAID_TASK_QUEUE="storm",  # a private broker
            CHESTAID_STABLE_SECONDS=str(self.stable_seconds),
            CHESTAID_REQUEUE_AFTER_SECONDS=str(self.requeue_after), CHESTAID_WORKER_HEARTBEAT_SECONDS="1",
            CHESTAID_BROKER_VISIBILITY_TIMEOUT=str(self.visibility_timeout), CHESTAID_PRECISION="fp32",
            CHESTAID_MAX_CLAIMS=str(self.max_claims), CHESTAID_DEBUG_CRASH_MARKER=self.poison_marker,
            CHESTAID_WEB_HOST="127.0.0.1",
            # One compute thread per process: two workers, the ingester and the web app share few cores.
            OMP_NUM_THREADS="1")

    # --- processes ------------------------------------------------------------------------------

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.env(), cwd=self.work, log_path=self.work / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def kill_worker(self) -> WorkerProcess:
        """SIGKILLs the oldest worker still running (main process and pool) and starts a replacement."""
        victim = next(w for w in self.workers if w not in self.killed and w.alive())
        victim.kill()
        self.killed.append(victim)
        self.start_worker()
        return victim

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w not in self.killed]

    def start_ingester(self) -> None:
        log = open(self.work / f"ingest-{self.ingester_starts}.log", "ab")
        self.ingester = subprocess.Popen([CHESTAID, "ingest"], cwd=self.work, env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.ingester_starts += 1

    def restart_ingester(self) -> None:
        """SIGKILLs the ingester mid-work (files may be half-claimed) and starts a new one at once."""
        _killpg(self.ingester)
        self.start_ingester()

    def wait_models(self, count: int, timeout: float = 240) -> None:
        """Waits until `count` worker processes have loaded the model and sent a heartbeat."""
        def ready():
            with session_scope(self.database_url) as s:
                return s.scalar(select(func.count()).select_from(WorkerHeartbeat)
                                .where(WorkerHeartbeat.model_version.is_not(None))) >= count
        wait_for(ready, timeout, 0.5, message=lambda: f"{count} workers with a model\n{self.logs()}")

    def healthz(self, timeout: float = 90) -> tuple[int, dict]:
        """Starts `chestaid web` on a free port and returns GET /healthz's status code and body."""
        port = free_port()
        log = open(self.work / "web.log", "ab")
        web = subprocess.Popen([CHESTAID, "web", "--port", str(port)], cwd=self.work, env=self.env(), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            def get():
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
                except httpx.HTTPError:
                    return None
            response = wait_for(get, timeout, 0.5, message=lambda: f"chestaid web on port {port}\n"
                                f"{(self.work / 'web.log').read_text(errors='replace')[-3000:]}")
            return response.status_code, response.json()
        finally:
            _killpg(web, signal.SIGTERM)

    def logs(self, tail: int = 3000) -> str:
        parts = [f"--- {w.log_path.name}\n{w.log()[-tail:]}" for w in self.workers]
        parts += [f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                  for p in sorted(self.work.glob("ingest-*.log"))]
        return "\n".join(parts)

    def worker_logs(self) -> str:
        return "\n".join(w.log() for w in self.workers)

    def _stop_processes(self) -> None:
        if self.ingester is not None:
            _killpg(self.ingester, signal.SIGTERM)
        for worker in self.live_workers():
            worker.stop()


def _killpg(proc: subprocess.Popen | None, sig: int = signal.SIGKILL, wait: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(wait)
    except ProcessLookupError:
        pass
