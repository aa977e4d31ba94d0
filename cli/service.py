"""Service processes: migrate, web, ingest, worker, and serve (all of them together)."""
from __future__ import annotations

import click

from cli._common import load_settings, setup_logging


def _bundle_warning(settings) -> str | None:
    from core.ml.bundle import META_FILE

    if (settings.model_dir / META_FILE).is_file():
        return None
    return (f"WARNING: no model bundle at {settings.model_dir} ({META_FILE} missing). Films will be received "
            "and queued, but scoring waits until a bundle exists (train/finalize one, or set CHESTAID_MODEL_DIR).")


@click.command()
def migrate() -> None:
    """Creates or upgrades the database schema (Alembic, head)."""
    from core.migrate import upgrade

    settings = load_settings()
    if settings.database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    click.echo(f"database at head: {settings.database_url}")


@click.command()
@click.option("--host", default=None, help="bind address (default CHESTAID_WEB_HOST, 127.0.0.1)")
@click.option("--port", type=int, default=None, help="port (default CHESTAID_WEB_PORT, 8000)")
def web(host: str | None, port: int | None) -> None:
    """Runs the worklist web app (uvicorn web.app:app)."""
    import uvicorn

    settings = load_settings()
    # proxy_headers off: X-Forwarded-For is judged by CHESTAID_TRUSTED_PROXIES alone (web.deps.client_host).
    uvicorn.run("web.app:app", host=host or settings.web_host, port=port or settings.web_port, proxy_headers=False)


@click.command()
def ingest() -> None:
    """Watches the inbox and turns each dropped file into an enqueued study."""
    import signal
    import threading

    from core.intake.watcher import Ingester
    from worker.app import make_enqueue, make_enqueue_group, warm_up

    setup_logging()
    settings = load_settings()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    warm_up()  # the first film's message then goes out as quickly as the rest
    ingester = Ingester(settings, make_enqueue(), enqueue_group=make_enqueue_group()).start()
    click.echo(f"ingesting films dropped into {settings.inbox}")
    stop.wait()
    ingester.stop()


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--concurrency", "-c", type=int, default=None,
              help="pool processes (default CHESTAID_WORKER_CONCURRENCY; when 0, one per core on a CPU, "
                   "one on a GPU)")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(concurrency: int | None, celery_args: tuple[str, ...]) -> None:
    """Runs a scoring worker: `celery -A worker.app worker` (extra arguments go to celery)."""
    from core.ml.threads import gpu_visible, pool_processes
    from worker.app import celery_app

    settings = load_settings()
    settings.ensure_dirs()  # the default broker is a SQLite file under the data dir
    processes = concurrency or settings.worker_concurrency or pool_processes(cuda=gpu_visible())
    celery_app.worker_main(["worker", f"--concurrency={processes}",
                            "--loglevel=INFO", *celery_args])


def _die_with_parent() -> None:
    """Linux: a child of `serve` gets SIGTERM if serve itself is killed before it can stop them."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@click.command()
def serve() -> None:
    """Migrates, then runs web, ingester and one worker together; Ctrl-C stops them all."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from core.migrate import upgrade

    settings = load_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url)
    # Children re-read settings from the environment: pin the resolved values so they agree.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHESTAID_DATA_DIR": str(settings.data_dir),
           "CHESTAID_INBOX": str(settings.inbox), "CHESTAID_DATABASE_URL": settings.database_url,
           "CHESTAID_BROKER_URL": settings.broker_url, "CHESTAID_MODEL_DIR": str(settings.model_dir)}
    me = [sys.executable, "-m", "cli"]
    commands = {"worker": [*me, "worker"], "ingest": [*me, "ingest"],
                "web": [*me, "web", "--host", settings.web_host, "--port", str(settings.web_port)]}
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    # Own sessions: a terminal Ctrl-C reaches only us, and we stop the children in order.
    children = {name: subprocess.Popen(cmd, env=env, start_new_session=True,
                                       preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                for name, cmd in commands.items()}
    warning = _bundle_warning(settings)
    if warning:
        click.echo(warning, err=True)
    from core import auth
    from core.db import session_scope

    with session_scope(settings.database_url) as session:
        if not auth.has_admin(session):
            click.echo("No admin account yet. Create the first one (password is prompted) with:\n"
                       "  chestaid user add NAME --role admin", err=True)
    url = f"http://{settings.web_host}:{settings.web_port}/"
    click.echo(f"Chest-Aid is running.\n  worklist:  {url}\n  inbox:     {settings.inbox}  (drop films here)\n"
               f"  data:      {settings.data_dir}\n  Ctrl-C stops everything.")
    code = 0
    while not stopping:
        dead = [name for name, proc in children.items() if proc.poll() is not None]
        if dead:
            click.echo(f"{', '.join(dead)} exited (code {children[dead[0]].returncode}); stopping the rest", err=True)
            code = 1
            break
        time.sleep(0.5)
    for name in ("ingest", "web", "worker"):  # stop intake first, the worker last so running tasks finish
        if children[name].poll() is None:
            children[name].send_signal(signal.SIGTERM)
    # A worker finishes its running task first (warm shutdown); a second Ctrl-C stops waiting.
    deadline = time.monotonic() + 30
    while any(p.poll() is None for p in children.values()) and time.monotonic() < deadline and len(stopping) < 2:
        time.sleep(0.2)
    for name, proc in children.items():
        if proc.poll() is None:
            click.echo(f"{name} did not stop; killing it", err=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    click.echo("stopped")
    sys.exit(code)


SERVICE_COMMANDS = [migrate, web, ingest, worker, serve]
