"""Each CPU forward pass runs with the cores the other processes leave free (core.ml.threads)."""
from __future__ import annotations

import subprocess
import sys
import time

import torch

from core.ml.threads import ThreadFit, _sample, threads_for


def test_threads_for_the_cores_left_free():
    assert threads_for(0.0, cores=2, full=2) == 2
    assert threads_for(0.4, cores=2, full=2) == 2  # a poll here and there: keep the team
    assert threads_for(0.65, cores=2, full=2) == 1  # the ingester taking a burst in
    assert threads_for(3.0, cores=2, full=2) == 1  # never fewer than one
    assert threads_for(2.2, cores=16, full=16) == 14
    assert threads_for(0.0, cores=16, full=8) == 8  # never more than asked for


class Clock:
    """Fake /proc samples: (machine busy CPU s, own CPU s, time s)."""

    def __init__(self):
        self.busy = self.own = self.t = 0.0

    def advance(self, seconds: float, *, own: float, others: float):
        self.t += seconds
        self.own += own * seconds
        self.busy += (own + others) * seconds

    def __call__(self):
        return self.busy, self.own, self.t


def test_thread_count_follows_the_other_processes_pass_by_pass():
    before = torch.get_num_threads()
    clock = Clock()
    fit = ThreadFit(full=2, cores=2, sample=clock)
    try:
        torch.set_num_threads(1)  # as another bundle in this process may have left it
        assert fit.fit() == 2 and torch.get_num_threads() == 2  # no interval yet: the full team
        clock.advance(0.5, own=1.9, others=0.05)
        assert fit.fit() == 2 and torch.get_num_threads() == 2
        clock.advance(0.5, own=1.3, others=0.7)  # another process holds most of a core
        assert fit.fit() == 1 and torch.get_num_threads() == 1
        clock.advance(0.01, own=1.0, others=1.0)  # too short an interval to tell: unchanged
        assert fit.fit() == 1
        clock.advance(0.5, own=1.0, others=0.1)  # it is done: the full team again
        assert fit.fit() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_busy_process_is_seen_in_proc():
    first = _sample()
    assert first is not None  # Linux
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        fit = ThreadFit(full=2, cores=2)
        time.sleep(1.0)
        others = fit.others_since_last()
    finally:
        spinner.wait()
    assert others is not None and 0.5 < others < 2.5  # the spinner's core (and whatever else ran meanwhile)
