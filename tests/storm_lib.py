"""The storm ("no film lost, no worker killed twice"): drop a plan of good and bad files into a live
stack, SIGKILL workers, restart Redis and the ingester meanwhile, wait for it to drain with no manual step,
then audit every dropped file against the database, the archive, the heat-maps and the worker logs.

`run_storm` returns a Report; its `violations` must be empty. Used by tests/test_storm.py and bench/storm.py.
"""
from __future__ import annotations

import ast
import hashlib
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from core.db import session_scope
from core.intake.claim import CLAIM_DIR
from core.intake.ingest import is_candidate
from core.ml.precision import BATCH_CANDIDATES
from core.models import Status, Study
from core.settings import Settings
from tests.storm_files import Dropper, Entry, make_plan
from tests.storm_stack import StormStack

POISON_MARKER = "chestaid-poison-pill"
SCORABLE = ("film", "slow", "replacement")
_FINISHED = re.compile(r"finished (\{[^}\n]*\})")
_STORED = re.compile(r"study (\d+) stored as scored")
_BATCH = re.compile(r"bursts in batches of (\d+)")
_POOL_DEATH = re.compile(r"Process 'ForkPoolWorker-\d+' pid:\d+ exited with")


@dataclass
class Report:
    """What the storm saw: the figures it prints and every property that did not hold."""

    stack: str
    dropped: int = 0
    accounted: int = 0
    lost: list[str] = field(default_factory=list)
    double_scored: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    drain_seconds: float | None = None
    scored: int = 0

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def summary(self) -> str:
        drain = f"{self.drain_seconds:.1f} s" if self.drain_seconds is not None else "did not drain"
        rate = (f"{self.accounted / self.drain_seconds:.2f} files/s, {self.scored / self.drain_seconds:.2f} "
                "scored/s" if self.drain_seconds else "n/a")
        lines = [f"== storm on the {self.stack} stack ==",
                 f"files dropped      {self.dropped}", f"accounted          {self.accounted}",
                 f"lost               {len(self.lost)} (must be 0)",
                 f"double-scored      {len(self.double_scored)} (must be 0)",
                 f"outcomes           {dict(sorted(self.outcomes.items()))}",
                 f"time to drain      {drain}", f"throughput         {rate}"]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"VIOLATION: {v}" for v in self.violations] or ["all storm properties hold"]
        return "\n".join(lines)


def run_storm(stack: StormStack, *, n: int, seed: int = 8, workers: int = 2, drain_timeout: float = 300,
              log=print) -> Report:
    """Runs one storm on a started (entered) stack and returns the audited Report."""
    report = Report(stack.kind)
    entries = make_plan(n, seed=seed, poison_marker=POISON_MARKER)
    report.dropped = len(entries)
    for _ in range(workers):
        stack.start_worker()
    stack.start_ingester()
    stack.wait_models(workers)
    log(f"[{stack.kind}] {workers} workers up; dropping {len(entries)} files")
    dropper = Dropper(stack.inbox, entries, pause_seconds=2 * stack.stable_seconds)
    events = _Chaos(stack, expected_scored=sum(e.kind in SCORABLE for e in entries), log=log)
    t0 = time.monotonic()
    dropper.drop_all(on_progress=events.on_drop)
    report.drain_seconds = _drain(stack, dropper, events, timeout=drain_timeout, t0=t0)
    report.notes.append(f"chaos: {', '.join(events.done)}")
    if report.drain_seconds is None:
        report.fail(f"not drained within {drain_timeout:.0f} s: {_pending(stack)}")
    dropper.join(5)
    report.violations += [f"dropper error {e}" for e in dropper.errors]
    audit(report, entries=entries, rows=_rows(stack.database_url), data_dir=stack.data_dir, inbox=stack.inbox,
          worker_logs=stack.worker_logs(), max_claims=stack.max_claims, worker_kills=len(stack.killed))
    for worker in stack.live_workers():
        if not worker.alive():
            report.fail(f"worker {worker.log_path.name} died (exit {worker.proc.returncode}) and was not killed "
                        "by the storm")
    code, body = stack.healthz()
    if code != 200 or body.get("status") != "ok":
        report.fail(f"/healthz answered {code} {body}")
    return report


class _Chaos:
    """Fires the storm's faults once each: the ingester restart half-way through the drop, then worker kills
    and the Redis restart as scoring passes 20%, 40% and 60% of the films."""

    def __init__(self, stack: StormStack, *, expected_scored: int, log):
        self.stack, self.expected, self.log = stack, max(1, expected_scored), log
        self.done: list[str] = []
        steps = [(0.2, "SIGKILL worker", stack.kill_worker), (0.6, "SIGKILL worker", stack.kill_worker)]
        if stack.redis is not None:
            steps.append((0.4, "restart redis", stack.redis.restart))
        self.pending = sorted(steps, key=lambda s: s[0])
        self.ingester_restarted = False

    def on_drop(self, fraction: float) -> None:
        if fraction >= 0.5 and not self.ingester_restarted:
            self.ingester_restarted = True
            self.stack.restart_ingester()
            self._fired("SIGKILL + restart ingester at 50% dropped")

    def on_scored(self, scored: int) -> None:
        while self.pending and scored / self.expected >= self.pending[0][0]:
            at, label, action = self.pending.pop(0)
            action()
            self._fired(f"{label} at {scored} scored")

    def finished(self) -> bool:
        return self.ingester_restarted and not self.pending

    def _fired(self, label: str) -> None:
        self.done.append(label)
        self.log(f"[{self.stack.kind}] chaos: {label}")


def _drain(stack: StormStack, dropper: Dropper, chaos: _Chaos, *, timeout: float, t0: float) -> float | None:
    """Waits until every fault fired, every writer finished, the inbox and claim folders are empty and every
    study is terminal (with the row count steady for 2 s); returns seconds since the first drop, None on timeout."""
    steady_since, last = None, None
    while time.monotonic() - t0 < timeout:
        with session_scope(stack.database_url) as s:
            statuses = Counter(s.scalars(select(Study.status)))
        chaos.on_scored(statuses[Status.SCORED])
        idle = (chaos.finished() and not dropper.busy() and not _inbox_left(stack.inbox)
                and all(k in Status.TERMINAL for k in statuses))
        now = time.monotonic()
        key = sum(statuses.values())
        if idle and key == last:
            steady_since = steady_since or now
            if now - steady_since >= 2.0:
                return steady_since - t0
        else:
            steady_since = None
        last = key
        time.sleep(0.3)
    return None


def _inbox_left(inbox: Path) -> list[str]:
    """Inbox entries still waiting, and files in claim folders (dot-folders the ingester uses are not waiting)."""
    left = [p.name for p in inbox.iterdir() if is_candidate(p)] if inbox.is_dir() else []
    left += [f"{CLAIM_DIR}/{p.parent.name}/{p.name}" for p in (inbox / CLAIM_DIR).glob("*/*")]
    return left


def _pending(stack: StormStack) -> str:
    with session_scope(stack.database_url) as s:
        stuck = [(r.id, r.source_name, r.status) for r in s.scalars(select(Study).where(
            Study.status.not_in(Status.TERMINAL)))]
    return f"inbox {_inbox_left(stack.inbox)[:10]}, non-terminal studies {stuck[:10]}"


def _rows(database_url: str) -> list[Study]:
    with session_scope(database_url) as s:
        return list(s.scalars(select(Study).order_by(Study.id)))


def audit(report: Report, *, entries: list[Entry], rows: list[Study], data_dir: Path, inbox: Path,
          worker_logs: str, max_claims: int, worker_kills: int = 0) -> None:
    """Checks every storm property on the final state and records figures and violations in `report`."""
    by_key: dict[tuple[str, str], list[Study]] = defaultdict(list)
    for row in rows:
        by_key[(row.sha256, row.source_name)].append(row)
    by_id = {row.id: row for row in rows}
    matched: set[int] = set()
    expected = [e for e in entries if not e.overwritten]
    if len(expected) < len(entries):
        report.notes.append(f"{len(entries) - len(expected)} file(s) replaced by their sender before the "
                            "ingester took them (never seen; not counted)")
        report.dropped = len(expected)
    for entry in expected:
        found = by_key.get((entry.sha256, entry.name), [])
        if not found:
            report.lost.append(f"{entry.name} ({entry.kind})")
            continue
        if len(found) > 1:
            report.fail(f"{entry.name} ({entry.kind}) recorded {len(found)} times: studies {[r.id for r in found]}")
        row = found[0]
        matched.update(r.id for r in found)
        report.outcomes[f"{entry.kind}:{row.status}"] += 1
        problem = _outcome_problem(entry, row, by_id, max_claims)
        if problem:
            report.fail(f"{entry.name} ({entry.kind}) study {row.id}: {problem}")
        elif len(found) == 1:  # accounted for exactly once
            report.accounted += 1
    if report.lost:
        report.fail(f"{len(report.lost)} file(s) lost: {report.lost[:10]}")

    slow_names = {e.name for e in expected if e.kind == "slow"}
    for row in rows:
        if row.id in matched:
            continue
        if row.source_name in slow_names and row.status == Status.FAILED and row.error:
            report.outcomes["slow:partial copy failed"] += 1  # taken during a pause; the whole file follows
        else:
            report.fail(f"study {row.id} ({row.source_name}, {row.status}) matches no dropped file")

    sends = [r.enqueue_count for r in rows if r.status != Status.DUPLICATE and r.sha256]
    if sends:  # each send beyond the first is a re-enqueue by the stale sweep (lost message or false alarm)
        report.notes.append(f"scoring tasks sent: {sum(sends)} for {len(sends)} studies (most for one study: "
                            f"{max(sends)})")
    _check_single_scoring(report, rows, data_dir, worker_logs, worker_kills=worker_kills)
    _check_archive(report, rows, data_dir)
    left = _inbox_left(inbox)
    if left:
        report.fail(f"inbox not empty: {left[:10]}")
    deaths = len(_POOL_DEATH.findall(worker_logs))
    report.notes.append(f"pool processes that died (poison file): {deaths}")
    if deaths > max_claims:
        report.fail(f"{deaths} pool processes died, more than max_claims={max_claims}")


def _outcome_problem(entry: Entry, row: Study, by_id: dict[int, Study], max_claims: int) -> str | None:
    """Says what is wrong with the row a dropped file became, or None."""
    if row.status not in Status.TERMINAL:
        return f"left {row.status}"
    if row.status in (Status.FAILED, Status.REFUSED) and not (row.error or "").strip():
        return f"{row.status} without a reason"
    if row.status == Status.DUPLICATE:
        original = by_id.get(row.duplicate_of_id)
        if original is None or original.sha256 != row.sha256 or original.status == Status.DUPLICATE:
            return f"duplicate of {row.duplicate_of_id}, which is not an original with the same bytes"
    if entry.kind == "poison":
        if "debug_crash_marker" not in Settings.model_fields:
            return (f"{row.status}: no debug_crash_marker setting yet, so the poison film was not poisonous and "
                    "containment was not exercised")
        if row.status != Status.FAILED or row.claim_count > max_claims:
            return f"poison file is {row.status} after {row.claim_count} claims (want failed after ≤ {max_claims})"
    elif entry.kind in ("corrupt", "empty", "symlink") and row.status != Status.FAILED:
        return f"is {row.status}, want failed with a reason"
    elif entry.kind in (*SCORABLE, "duplicate") and row.status not in (Status.SCORED, Status.DUPLICATE):
        return f"is {row.status} ({row.error}), want scored"
    return None


def _check_single_scoring(report: Report, rows: list[Study], data_dir: Path, worker_logs: str, *,
                          worker_kills: int) -> None:
    """No film is scored twice: one scored row per content, one heat-map per scored row and none for others,
    and at most one 'scored' outcome per study in the worker logs.

    A pass's "stored as scored" lines follow its commit, so each of the `worker_kills` workers SIGKILLed may have
    stored one pass (at most its burst batch, which each pool process logs at start) that it never logged: the
    chaos kills a worker when the scored count reaches a mark, just after a commit. Any more missing lines, or
    none at all, mean the logs cannot show double scoring."""
    scored = [r for r in rows if r.status == Status.SCORED]
    report.scored = len(scored)
    per_sha = Counter(r.sha256 for r in scored)
    report.double_scored += [f"{sha[:12]} scored as {n} studies" for sha, n in per_sha.items() if n > 1]
    outcomes: Counter = Counter()
    # Scored outcomes from the line each result logs as it is stored (a task's closing "finished" line is lost
    # when the chaos kills its worker mid-batch); the other outcomes from those closing lines.
    for match in _FINISHED.finditer(worker_logs):
        for sid, outcome in ast.literal_eval(match.group(1)).items():
            if outcome != "scored":
                outcomes[(int(sid), outcome)] += 1
    for match in _STORED.finditer(worker_logs):
        outcomes[(int(match.group(1)), "scored")] += 1
    report.double_scored += [f"study {sid} scored {n} times (worker logs)" for (sid, o), n in outcomes.items()
                             if o == "scored" and n > 1]
    logged = sum(n for (_, o), n in outcomes.items() if o == "scored")
    unlogged = len({r.id for r in scored} - {sid for (sid, o) in outcomes if o == "scored"})
    batch = max((int(b) for b in _BATCH.findall(worker_logs)), default=max(BATCH_CANDIDATES["cpu"]))
    if (scored and not logged) or unlogged > worker_kills * batch:
        report.fail(f"worker logs show {logged} scored outcomes for {len(scored)} scored studies, {unlogged} "
                    f"unlogged with {worker_kills} worker(s) killed: cannot check double scoring from them "
                    "(log format changed?)")
    skipped = sum(n for (_, o), n in outcomes.items() if o == "skipped")
    report.notes.append(f"redundant deliveries skipped by the claim check: {skipped}")
    heatmaps = {p.name for p in (data_dir / "heatmaps").glob("*.png") if not p.name.startswith(".")}
    want = {Path(r.heatmap_path or "").name for r in scored}
    missing = [r.id for r in scored if not r.heatmap_path or not (data_dir / r.heatmap_path).is_file()]
    if missing:
        report.fail(f"scored studies without a heat-map: {missing[:10]}")
    if heatmaps - want:
        report.double_scored.append(f"heat-maps of studies that are not scored: {sorted(heatmaps - want)[:10]}")
    if report.double_scored:
        report.fail(f"double scoring: {report.double_scored[:10]}")


def _check_archive(report: Report, rows: list[Study], data_dir: Path) -> None:
    """Every row that read its file names a kept copy whose sha256 is the row's."""
    for row in rows:
        if not row.sha256:
            continue  # never read (a link): nothing was kept
        path = Path(row.stored_path)
        path = path if path.is_absolute() else data_dir / path
        if not path.is_file():
            report.fail(f"study {row.id} ({row.source_name}, {row.status}): kept copy {row.stored_path} is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != row.sha256:
            report.fail(f"study {row.id} ({row.source_name}): kept copy {row.stored_path} does not match its sha256")
