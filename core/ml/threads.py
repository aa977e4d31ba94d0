"""CPU threads for each forward pass, fitted to what the other processes on the machine leave free.

PyTorch runs a CPU forward pass on an OpenMP team of one thread per core, and every parallel region waits for
its slowest thread. When another process holds part of a core (on a shared 2-core server, the ingester taking
a burst in: about two thirds of one core), the thread that shares that core keeps the whole team waiting:
measured on a 2-core EPYC, a pass then took about 3x as long as on an idle machine, where one thread alone
takes 1.7x as long. So before each pass `ThreadFit.fit` reads how many cores the other processes used since the
last pass (Linux /proc) and runs the pass with the cores left free (at least one, at most the full team).

It also plans a worker's pool: on a CPU, one process per core with one thread each. DenseNet's many small layers
scale poorly across an OpenMP team: on a 2-core EPYC (Zen 3, AVX2) forward+CAM at batch 8 ran 11.4-15.1 img/s
in one 2-thread process and 16.9-19.3 img/s in two 1-thread processes, interleaved runs. A 1-thread process
also never waits at a barrier for a core that the ingester holds.
"""
from __future__ import annotations

import math
import os
import time

import torch

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


MAX_PROCESSES = 8  # past this, each process gets more threads rather than another copy of the model in memory


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpu_visible() -> bool:
    """Whether torch sees a CUDA device, asked through NVML so that this process (a worker's parent, which
    forks the pool) does not initialise CUDA, which its forked children could then not use."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def pool_processes(*, cuda: bool, cores: int | None = None) -> int:
    """A worker's pool size when none is configured: one process per usable core on a CPU (at most
    MAX_PROCESSES); one on a GPU, which takes large batches from a single process."""
    if cuda:
        return 1
    return max(1, min(MAX_PROCESSES, cores or usable_cores()))


def threads_per_process(processes: int, *, cores: int | None = None) -> int:
    """Torch threads for each of a pool's processes: the usable cores shared out, at least one each."""
    return max(1, (cores or usable_cores()) // max(1, processes))


def threads_for(others: float, *, cores: int, full: int) -> int:
    """Threads for a pass when other processes kept `others` cores busy: the cores they leave, rounded to the
    nearest whole one, never fewer than one nor more than `full`."""
    return max(1, min(full, math.floor(cores - others + 0.5)))


def machine_busy_seconds() -> float:
    """Seconds of busy CPU on the whole machine since boot (user … steal, without idle and iowait; Linux
    /proc/stat). Raises OSError where there is no /proc."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _HZ  # user … steal; guest time is already counted in user


def _sample() -> tuple[float, float, float] | None:
    """(seconds of busy CPU on the machine, seconds of CPU of this process, monotonic time), or None off Linux."""
    try:
        busy = machine_busy_seconds()
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return busy, (int(own[11]) + int(own[12])) / _HZ, time.monotonic()


class ThreadFit:
    """Sets torch's intra-op threads before each CPU pass from the other processes' use since the last one."""

    def __init__(self, full: int | None = None, cores: int | None = None, sample=_sample):
        self.full = full or torch.get_num_threads()
        self.cores = cores or os.cpu_count() or 1
        self.threads = self.full
        self._sample = sample
        self._last = sample()

    def others_since_last(self) -> float | None:
        """Cores the other processes kept busy since the last call (None when it cannot tell)."""
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[2] - last[2] < 0.05:  # too short to tell from clock ticks
            return None
        return max(0.0, ((now[0] - last[0]) - (now[1] - last[1])) / (now[2] - last[2]))

    def fit(self) -> int:
        """Sets and returns the thread count for the coming pass (unchanged when the last interval says nothing)."""
        others = self.others_since_last()
        if others is not None:
            self.threads = threads_for(others, cores=self.cores, full=self.full)
        # Torch's thread count is per process, and another bundle in it (tests, `chestaid evaluate`) may have set it.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads
