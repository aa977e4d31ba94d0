"""The pool's processes agree on one burst batch from all their probes (worker.pool_batch), in real forked
processes sharing the agreement as a worker's pool does."""
from __future__ import annotations

import multiprocessing
import time

import pytest

from core.ml.precision import pick_batch
from tests.services import wait_for
from worker.pool_batch import PoolBatch

# Alone, A would pick 16 and B 4 (pick_batch: the smallest within 2 % of the best); together 8 is best (24 img/s).
A = {4: 10.0, 8: 12.0, 16: 12.5}
B = {4: 12.0, 8: 12.0, 16: 10.0}


def _agree(agreement: PoolBatch, figures: dict, out) -> None:
    def probe() -> dict:  # a probe takes seconds: the siblings' probes overlap, as the pool's do at start
        time.sleep(1.0)
        return figures
    out.put(agreement.agree(probe, pick_batch))


def _never_probes() -> dict:
    raise AssertionError("a process joining after the decision must not probe")


def _join_late(agreement: PoolBatch, out) -> None:
    out.put(agreement.agree(_never_probes, pick_batch))


def _failing_probe() -> dict:
    raise RuntimeError("probe failed")


def _probe_forever(agreement: PoolBatch) -> None:
    agreement.agree(lambda: time.sleep(3600) or {}, pick_batch)


def test_pool_processes_pick_one_batch_from_the_sum_of_their_probes():
    assert (pick_batch(A), pick_batch(B)) == (16, 4)
    ctx = multiprocessing.get_context("fork")
    agreement = PoolBatch(2, (4, 8, 16, 32, 64), timeout=30)
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(agreement, f, out)) for f in (A, B)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(out.get(timeout=5) for _ in procs) == [8, 8]
    assert agreement.decided == 8
    # A replacement process (one died) takes the decision without a probe of its own.
    late = ctx.Process(target=_join_late, args=(agreement, out))
    late.start()
    late.join(30)
    assert late.exitcode == 0 and out.get(timeout=5) == 8


def test_a_process_alone_decides_at_once_and_a_failed_probe_leaves_the_others_free():
    agreement = PoolBatch(2, (4, 8, 16), timeout=60)
    with pytest.raises(RuntimeError):
        agreement.agree(_failing_probe, pick_batch)
    t0 = time.monotonic()
    # Its sibling is not probing (its model is not loaded yet, or its probe failed): no wait for the timeout.
    assert agreement.agree(lambda: dict(A), pick_batch) == 16
    assert time.monotonic() - t0 < 30
    assert agreement.agree(lambda: dict(B), pick_batch) == 16  # decided once, for the pool's life


def test_a_sibling_that_dies_while_probing_is_waited_for_only_until_the_timeout():
    ctx = multiprocessing.get_context("fork")
    agreement = PoolBatch(2, (4, 8, 16), timeout=0.5)
    stuck = ctx.Process(target=_probe_forever, args=(agreement,))
    stuck.start()
    try:
        wait_for(lambda: agreement._started.value == 1, 20, message="the sibling began probing")
        t0 = time.monotonic()
        assert agreement.agree(lambda: dict(B), pick_batch) == 4  # its own figures, once the timeout passed
        assert time.monotonic() - t0 >= 0.5
    finally:
        stuck.kill()
        stuck.join(10)
