"""Test helpers for isolated databases, waiting on conditions and real worker processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from core.db import get_engine
from core.migrate import upgrade


@contextmanager
def fresh_postgres_database(base_url: str) -> Iterator[str]:
    """Creates a uniquely named, migrated database next to base_url's and drops it afterwards."""
    name = f"chestaid_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(base_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def fresh_sqlite_database(directory: Path) -> str:
    """Creates a migrated SQLite database file in directory."""
    directory.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{directory / f'chestaid-{uuid.uuid4().hex[:8]}.db'}"
    upgrade(url)
    return url


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.1,
             message: str | Callable[[], str] = "condition") -> object:
    """Polls predicate until it returns a truthy value; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message() if callable(message) else message}")
        time.sleep(interval)


def clean_env(**overrides: str) -> dict[str, str]:
    """Returns os.environ without any CHESTAID_ variable, plus the overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHESTAID_")}
    env.update({"PYTHONUNBUFFERED": "1", **overrides})
    return env


class WorkerProcess:
    """A real `celery -A worker.app worker --pool=prefork -c 1` process in its own process group."""

    def __init__(self, env: dict[str, str], cwd: Path, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool=prefork", "-c", "1",
               "--loglevel=INFO", "-n", f"test-{uuid.uuid4().hex[:6]}@%h", "--without-gossip",
               "--without-mingle", "--without-heartbeat"]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILLs the whole worker (main process and pool children), as a lost machine would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        """Warm shutdown, then kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
