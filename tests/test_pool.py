"""A worker's pool on a CPU: one process per core with its share of the cores as torch threads (core.ml.threads),
which every pool process reports in its heartbeat; on a GPU, one process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import select

from core.db import get_engine, session_scope
from core.ml import precision
from core.ml.threads import MAX_PROCESSES, gpu_visible, pool_processes, threads_per_process
from core.models import WorkerHeartbeat
from core.settings import Settings
from tests.services import clean_env, wait_for


def test_a_cpu_pool_has_one_process_per_core_and_a_gpu_pool_one():
    assert pool_processes(cuda=False, cores=2) == 2
    assert pool_processes(cuda=False, cores=1) == 1
    assert pool_processes(cuda=False, cores=64) == MAX_PROCESSES == 8  # not 64 copies of the model in memory
    assert pool_processes(cuda=True, cores=16) == 1


def test_the_cores_are_shared_out_as_threads():
    assert threads_per_process(2, cores=2) == 1
    assert threads_per_process(1, cores=2) == 2  # `-c 1`: the one process gets the machine
    assert threads_per_process(8, cores=64) == 8
    assert threads_per_process(4, cores=2) == 1  # more processes than cores: never fewer than one thread


def test_the_gpu_check_leaves_cuda_uninitialised_for_the_forked_pool():
    # On a CPU-only machine CUDA stays uninitialised whatever the check does, so the NVML switch the check relies
    # on (torch asks NVML, not the CUDA driver, and the forked pool can still use the GPU) is asserted too.
    code = ("import os, torch\nfrom core.ml.threads import gpu_visible\ngpu_visible()\n"
            "print(torch.cuda.is_initialized(), os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "1"]


@pytest.mark.services
@pytest.mark.parametrize("batch", ["2", "0"])
def test_the_worker_command_runs_one_process_per_core_each_with_its_threads(tmp_path, bundle_dir, batch):
    """With CHESTAID_SCORE_BATCH_SIZE every process runs that batch; with 0 (measure) the pool's processes agree
    on one batch from all their probes (worker.pool_batch)."""
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", model_dir=bundle_dir)
    settings.ensure_dirs()
    from core.migrate import upgrade
    upgrade(settings.database_url)
    cuda = gpu_visible()
    expected = pool_processes(cuda=cuda)
    env = clean_env(CHESTAID_MODEL_DIR=str(bundle_dir), CHESTAID_PRECISION="fp32", CHESTAID_SCORE_BATCH_SIZE=batch,
                    CHESTAID_WORKER_HEARTBEAT_SECONDS="1")
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def beats():
        assert proc.poll() is None, log_path.read_text(errors="replace")
        with session_scope(settings.database_url) as session:
            rows = session.scalars(select(WorkerHeartbeat)).all()
        return rows if len(rows) >= expected else None
    try:
        rows = wait_for(beats, 180, 0.5, message=lambda: f"{expected} heartbeats\n{log_path.read_text()}")
        assert len(rows) == expected  # one per pool process: each loaded the model
        assert len({r.name for r in rows}) == expected
        share = "" if cuda else f", {threads_per_process(expected)} thread"  # a GPU worker names no CPU threads
        assert all(r.device.startswith("cuda fp32" if cuda else "cpu fp32") and share in r.device
                   for r in rows), [r.device for r in rows]
        batches = {r.device.rpartition(", batch ")[2] for r in rows}
        if batch != "0":
            assert batches == {batch}
        else:
            candidates = {str(b) for b in precision.BATCH_CANDIDATES["cuda" if cuda else "cpu"]}
            assert len(batches) == 1 and batches <= candidates, [r.device for r in rows]
            if expected > 1:
                # Decided once for the pool (from both probes when they overlapped, as they do at start).
                assert log_path.read_text().count(f"for the pool's {expected} process(es), from ") == 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        get_engine(settings.database_url).dispose()
