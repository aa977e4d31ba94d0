"""Drops N films into a running ingester + worker and reports throughput, latency and a per-stage breakdown.

Usage:
    python bench/bench_pipeline.py                       # embedded defaults (SQLite + kombu sqla broker)
    python bench/bench_pipeline.py --postgres URL --redis URL
Options: -n 40 films (cycled from ../shared/data/chest_xray/train or tests/fixtures), --model DIR.
Prints figures; it asserts nothing (speed goals are checked by reading these numbers).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402

from core.db import session_scope  # noqa: E402
from core.migrate import upgrade  # noqa: E402
from core.ml.threads import gpu_visible, machine_busy_seconds, pool_processes  # noqa: E402
from core.models import Status, Study  # noqa: E402

STAGES = ["decode_ms", "preprocess_ms", "forward_cam_ms", "forward_cpu_ms", "ood_ms", "heatmap_ms"]


def source_films(n: int) -> list[Path]:
    data = REPO.parent / "shared" / "data" / "chest_xray" / "train"
    films = sorted(data.glob("*/*.jpeg"))[::50] if data.is_dir() else sorted((REPO / "tests" / "fixtures").glob("*.jpeg"))
    return [films[i % len(films)] for i in range(n)]


def fresh_postgres(base_url: str) -> tuple[str, callable]:
    name = f"chestaid_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = base_url.rsplit("/", 1)[0] + f"/{name}"

    def drop():
        from core.db import get_engine
        get_engine(url).dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return url, drop


def run(label: str, n: int, env_extra: dict, model: Path, concurrency: int, *, one_at_a_time: bool = False,
        in_place: bool = False) -> dict:
    """Runs one stack on N films and prints its figures; returns them (throughput, p50, p95).

    one_at_a_time drops each film only once the one before it is scored: drop→scored latency at idle.
    Films are written under a dot name and renamed into the inbox (as the DICOM receiver and rsync do), or with
    in_place written straight under their names, as a plain copy into the inbox does: each of those waits out the
    stability wait (0.2 s here).
    """
    work = Path(tempfile.mkdtemp(prefix="chestaid-bench-"))
    env = {**os.environ, "CHESTAID_DATA_DIR": str(work / "var"), "CHESTAID_INBOX": str(work / "inbox"),
           "CHESTAID_MODEL_DIR": str(model), "CHESTAID_STABLE_SECONDS": "0.2", **env_extra}
    db_url = env.get("CHESTAID_DATABASE_URL") or f"sqlite:///{work / 'var' / 'chestaid.db'}"
    env["CHESTAID_DATABASE_URL"] = db_url
    (work / "var").mkdir(parents=True)
    (work / "inbox").mkdir()
    upgrade(db_url)
    chestaid = str(Path(sys.executable).parent / "chestaid")
    logs = {name: open(work / f"{name}.log", "wb") for name in ("worker", "ingest")}  # shown if the stack fails
    procs = [subprocess.Popen([chestaid, "worker", "--concurrency", str(concurrency)], env=env,
                              stdout=logs["worker"], stderr=subprocess.STDOUT, start_new_session=True),
             subprocess.Popen([chestaid, "ingest"], env=env, stdout=logs["ingest"], stderr=subprocess.STDOUT,
                              start_new_session=True)]
    try:
        try:
            devices = _wait_for_worker(db_url, concurrency or pool_processes(cuda=gpu_visible()), procs[0])
        except SystemExit:
            for name in logs:
                print(f"--- {name} log, last lines ---\n"
                      + "\n".join((work / f"{name}.log").read_text(errors="replace").splitlines()[-30:]))
            raise
        films = source_films(n)
        dropped = {}
        cpu_start = [_tree_cpu_seconds(p.pid) for p in procs]
        busy_start, own_start = machine_busy_seconds(), time.process_time()
        t_start = time.time()
        for i, film in enumerate(films):
            name = f"bench_{i:04d}_{film.name}"
            final = work / "inbox" / name
            written = final if in_place else work / "inbox" / f".{name}.part"
            # Each copy gets a unique trailing comment byte-range so duplicates are not short-circuited.
            written.write_bytes(film.read_bytes() + f"\n{i}".encode())
            if written != final:
                os.replace(written, final)
            dropped[name] = time.time()
            if one_at_a_time:
                _wait_for_scored(db_url, i + 1, timeout=60)
        rows = _wait_for_scored(db_url, n, timeout=60 + 10 * n)
        wall = max(r.scored_at.timestamp() for r in rows if r.scored_at) - t_start
        latencies = sorted(r.scored_at.timestamp() - dropped[r.source_name] for r in rows if r.scored_at)
        failed = [r for r in rows if r.status != Status.SCORED]
        cpu_end = [_tree_cpu_seconds(p.pid) for p in procs]
        machine_busy, own = machine_busy_seconds() - busy_start, time.process_time() - own_start
        # Per process: a pool process alive at both reads counts its difference (the main and pool processes
        # outlive a burst); the ingester is one process.
        worker_cpu = {pid: t - cpu_start[0].get(pid, 0.0) for pid, t in cpu_end[0].items()}
        cpu = [sum(worker_cpu.values()), sum(cpu_end[1].values()) - sum(cpu_start[1].values())]
        print(f"\n== {label}: {n} films, worker concurrency {concurrency or 'default'} ==")
        print("pool processes   " + "; ".join(devices))
        print(f"throughput       {len(latencies) / wall:.2f} studies/s ({len(latencies)} scored in {wall:.1f} s, "
              f"{len(failed)} not scored{_by_status(failed)})")
        if latencies:
            print(f"latency p50      {statistics.median(latencies):.2f} s (drop → scored)")
            print(f"latency p95      {latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]:.2f} s")
        for stage in STAGES:
            vals = [r.timings.get(stage) for r in rows if r.timings and r.timings.get(stage) is not None]
            if vals:
                print(f"{stage:16s} median {statistics.median(vals):8.1f} ms   p95 "
                      f"{sorted(vals)[min(len(vals) - 1, int(0.95 * len(vals)))]:8.1f} ms")
        # Where the machine's time went: the model's share is what the rest (ingest, decode, encode, database,
        # broker) leaves it, so these say what to cut next.
        print(f"cpu seconds      worker {cpu[0]:.1f}, ingester {cpu[1]:.1f} "
              f"({1000 * cpu[1] / n:.0f} ms per film); wall {wall:.1f} s on {os.cpu_count()} cores")
        # The database server, the broker and anything else on the machine: on Postgres + Redis, CPU the network
        # does not get that the service's own processes do not show.
        print(f"other cpu        {machine_busy - cpu[0] - cpu[1] - own:.1f} s (database server, broker, rest of the machine); "
              f"this bench {own:.1f} s")
        print(f"worker cpu       main process {worker_cpu.pop(procs[0].pid, 0.0):.1f} s, pool processes "
              + ", ".join(f"{pid}: {t:.1f} s" for pid, t in sorted(worker_cpu.items())))
        sizes = [r.timings.get("batch_size", 1) for r in rows if r.timings]
        if sizes:
            print(f"batch size       mean {statistics.mean(sizes):.1f}")
        # Each pool process's share of the burst spent in forward passes: what is left is its idle time and
        # its own overhead (claims, decode, persistence, messages), the service's gap to the limit.
        in_forward: dict[str, float] = {}
        span: dict[str, list[float]] = {}  # first claim and last result of each pool process, from the start
        for r in rows:
            if r.timings and r.worker and r.timings.get("forward_cam_ms") is not None:
                in_forward[r.worker] = in_forward.get(r.worker, 0.0) + r.timings["forward_cam_ms"] / 1000
                first, last = r.started_at.timestamp() - t_start, r.scored_at.timestamp() - t_start
                seen = span.setdefault(r.worker, [first, last])
                seen[0], seen[1] = min(seen[0], first), max(seen[1], last)
        for name, busy in sorted(in_forward.items()):
            first, last = span[name]
            print(f"in forward       {name.rsplit(':', 1)[-1]:>8s}: {busy:.1f} s of {wall:.1f} s ({busy / wall:.0%}); "
                  f"first claim at {first:.1f} s, last result at {last:.1f} s")
        if len(span) > 1:  # a core idle while another process finishes its last pass
            lasts = [last for _, last in span.values()]
            print(f"tail             {max(lasts) - min(lasts):.2f} s between the pool processes' last results")
        _print_ramp(rows, dropped)
        _print_pace(rows, t_start, max(dropped.values()) - t_start)
        return {"throughput": len(latencies) / wall if wall > 0 else 0.0,
                "p50": statistics.median(latencies) if latencies else None,
                "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs.values():
            f.close()
        shutil.rmtree(work, ignore_errors=True)


def _tree_cpu_seconds(root: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by a process and each of its live descendants (Linux /proc),
    by pid."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in tree]
        tree.update(kids)
        frontier += kids
    return {pid: stats[pid][1] / os.sysconf("SC_CLK_TCK") for pid in tree if pid in stats}


def _by_status(rows: list[Study]) -> str:
    """Says what became of the films that were not scored, e.g. ": refused 2" (the OOD guard's refusals)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return (": " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))) if counts else ""


def _wait_for_worker(db_url: str, processes: int, worker: subprocess.Popen, timeout: float = 300) -> list[str]:
    """Waits until every pool process has loaded the model (each beats once it has): a burst dropped while one
    still runs its start-up probe would be timed against a pool short of a process. Returns each one's device
    label (precision, probe figure, threads, burst batch). Gives up at once if the worker exits."""
    from core.models import WorkerHeartbeat
    deadline = time.time() + timeout
    while time.time() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited ({worker.returncode}) before its pool came up")
        try:
            with session_scope(db_url) as s:
                beats = s.query(WorkerHeartbeat).filter(WorkerHeartbeat.model_version.is_not(None)).all()
                if len(beats) >= processes:
                    return [f"{b.name.rsplit(':', 1)[-1]}: {b.device}" for b in beats]
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit("no worker came up with a model (is the bundle present?)")


def _print_ramp(rows: list[Study], dropped: dict[str, float]) -> None:
    """Where the first films' time went, from the drop (median of the first 8 scored): the ramp before the pool's
    first pass is CPU the network cannot use."""
    first = sorted((r for r in rows if r.scored_at and r.source_name in dropped),
                   key=lambda r: dropped[r.source_name])[:8]
    if not first or any(r.enqueued_at is None or r.started_at is None for r in first):
        return
    steps = [("stable+ingested", lambda r: r.received_at.timestamp() - dropped[r.source_name]),
             ("sent", lambda r: r.enqueued_at.timestamp() - r.received_at.timestamp()),
             ("claimed", lambda r: r.started_at.timestamp() - r.enqueued_at.timestamp()),
             ("scored", lambda r: r.scored_at.timestamp() - r.started_at.timestamp())]
    print("ramp, first 8    " + ", ".join(f"{name} +{1000 * statistics.median(f(r) for r in first):.0f} ms"
                                          for name, f in steps))


def _print_pace(rows: list[Study], t_start: float, drop_seconds: float) -> None:
    """When half and all of the burst had been ingested, claimed and scored, from the drop's start: a stage that
    finishes late beside the next one is the one that holds the burst back."""
    def at(stamps: list) -> str:
        times = sorted(t.timestamp() - t_start for t in stamps if t is not None)
        return f"{times[len(times) // 2]:.2f} / {times[-1]:.2f} s" if times else "-"
    print(f"pace, half/all   dropped by {drop_seconds:.2f} s, ingested {at([r.received_at for r in rows])}, "
          f"claimed {at([r.started_at for r in rows])}, scored {at([r.scored_at for r in rows])}")


def _wait_for_scored(db_url: str, n: int, timeout: float) -> list[Study]:
    # One count per poll (the bench shares the CPU with the service it measures); the rows once, at the end.
    from sqlalchemy import func, select
    deadline = time.time() + timeout
    while time.time() < deadline:
        with session_scope(db_url) as s:
            total = s.scalar(select(func.count()).select_from(Study)) or 0
            done = s.scalar(select(func.count()).select_from(Study).where(Study.status.in_(Status.TERMINAL))) or 0
            if total >= n and done == total:
                return s.query(Study).all()
        time.sleep(0.25)
    raise SystemExit(f"timed out: not all {n} films were scored")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "default")
    ap.add_argument("--concurrency", type=int, default=0, help="worker pool processes (0: the service's default)")
    ap.add_argument("--postgres", help="base URL of a Postgres server (a scratch database is created)")
    ap.add_argument("--redis", help="Redis URL for the broker")
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--in-place", action="store_true", help="write films straight under their names (no rename)")
    args = ap.parse_args()
    if not args.skip_embedded:
        run("embedded defaults (SQLite + kombu sqla broker)", args.n, {}, args.model, args.concurrency,
            in_place=args.in_place)
    if args.postgres and args.redis:
        url, drop = fresh_postgres(args.postgres)
        try:
            run("Redis + Postgres", args.n, {"CHESTAID_DATABASE_URL": url, "CHESTAID_BROKER_URL": args.redis},
                args.model, args.concurrency, in_place=args.in_place)
        finally:
            drop()


if __name__ == "__main__":
    main()
