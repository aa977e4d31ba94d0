"""One burst batch size for all of a worker's pool processes, agreed from all their probes.

Each pool process times forward+CAM at every batch candidate side by side with the others (as bursts run them),
posts its figures to memory the pool shares, waits for the others' and picks from the sum: the pool's images/s
at each batch. Every process then runs the same batch. Probed alone, a noisy round could tip one process to 16
and the other to 4, and a burst then ended with one core idle while the other ran its last large passes
(measured on a 2-core AMD EPYC: 0.9 s of a 10 s burst). A process that starts after the decision (a replacement
for one that died, or one that loaded its model late) takes it without probing.

The shared state is made in the worker's main process before its pool forks (worker.tasks, on worker_init).
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


class PoolBatch:
    """The pool's shared probe figures (one row per process), how many processes are probing, and the decision
    (0 until made)."""

    def __init__(self, processes: int, candidates: Sequence[int], *, timeout: float = 120.0):
        ctx = multiprocessing.get_context("fork")
        self.processes, self.candidates, self.timeout = processes, tuple(sorted(set(candidates))), timeout
        self._figures = ctx.Array("d", processes * len(self.candidates), lock=False)
        self._started = ctx.Value("i", 0, lock=False)
        self._posted = ctx.Value("i", 0, lock=False)
        self._decided = ctx.Value("i", 0, lock=False)
        self._lock = ctx.Lock()

    @property
    def decided(self) -> int:
        """The agreed batch size, 0 while the pool is still probing."""
        with self._lock:
            return self._decided.value

    def agree(self, measure: Callable[[], dict[int, float]], pick: Callable[[dict[int, float]], int]) -> int:
        """Returns the pool's batch size: measures this process's figures ({batch: images/s}), posts them, waits
        until every process that began probing has posted (at most `timeout` s, for one that died probing), and
        picks from the sums; the first to decide fixes it for the pool's life.

        Only siblings already probing are waited for: a process that loads its model later (the bundle was
        installed after the worker started) must not hold up the scoring of one that has it."""
        with self._lock:
            if self._decided.value:
                return self._decided.value
            self._started.value += 1
        try:
            own = measure()
        except BaseException:
            with self._lock:
                self._started.value -= 1
            raise
        width = len(self.candidates)
        with self._lock:
            if self._decided.value:
                return self._decided.value
            row = self._posted.value
            if row < self.processes:  # else a replacement started while the others probed: it just waits
                for i, b in enumerate(self.candidates):
                    self._figures[row * width + i] = own.get(b, 0.0)
                self._posted.value = row + 1
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._decided.value or self._posted.value >= min(self._started.value, self.processes):
                    break
            time.sleep(0.05)
        with self._lock:
            if not self._decided.value:
                rows = min(self._posted.value, self.processes)
                total = {b: sum(self._figures[r * width + self.candidates.index(b)] for r in range(rows))
                         for b in own}
                self._decided.value = pick(total)
                log.info("burst batch size %d for the pool's %d process(es), from %d probe(s) (%s img/s together)",
                         self._decided.value, self.processes, rows,
                         ", ".join(f"{b}: {v:.1f}" for b, v in total.items()))
            return self._decided.value
