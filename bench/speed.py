"""Speed against the naive baseline, in one process tree on one machine, so the ratios are honest.

Prints, for the bundle (default: the shipped one):
1. the CPU/GPU, its flags and torch's view of it (every figure belongs to a machine);
2. the naive baseline: per-image fp32 forward + autograd Grad-CAM with hooks at features.norm5;
3. the forward+CAM limit of each allowed precision at batch sizes 1…16 (1…256 on a GPU) in one process using
   every core, and, on a CPU, of the chosen mode in one process per core with one thread each (as a worker's
   pool runs it), all processes at once; the limit is the better of the two;
4. the service end to end (bench/bench_pipeline.py's runner): a burst of films dropped into the inbox (each
   written under a dot name and renamed in; with --in-place, written straight under its name and so held for the
   0.2 s stability wait), on embedded defaults and, with --postgres/--redis, on Postgres + Redis; and the same one
   film at a time;
5. the ratios service ÷ limit and service ÷ naive, and, on a CPU, the burst against the pool limit measured again
   right after it and against the mean of the pool limits measured before the burst's stack starts and right
   after it (the machine's speed drifts, both ways, within minutes).

    python bench/speed.py [--burst 200] [--idle 20] [--postgres URL --redis URL] [--model DIR] [--device cuda]
                          [--precision fp32] [--in-place]

It asserts nothing: targets are judged by reading the figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.films.imaging import load_grayscale  # noqa: E402
from core.ml import precision  # noqa: E402
from core.ml.bundle import bf16_allowed, load_bundle, load_network, read_meta  # noqa: E402
from core.ml.gradcam import normalize_maps  # noqa: E402
from core.ml.preprocess import preprocess  # noqa: E402
from core.ml.threads import pool_processes, threads_per_process  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64)
CUDA_BATCHES = BATCHES + (128, 256)  # the service tries up to 256 on a GPU (precision.BATCH_CANDIDATES)


def machine() -> str:
    """Describes the processor (model, family, relevant flags) and accelerator the figures were measured on."""
    lines = [f"cpu: {precision.describe_cpu()}, {torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}")
    lines.append(f"torch {torch.__version__}")
    return "\n".join(lines)


def films(n: int) -> list:
    """Real films as the service decodes them (tests/fixtures, cycled)."""
    paths = sorted((REPO / "tests" / "fixtures").glob("*.jpeg"))
    return [load_grayscale(paths[i % len(paths)]) for i in range(n)]


def naive_images_per_s(model: Path, device: torch.device, n: int) -> float:
    """Per-image fp32 forward and a backward pass for Grad-CAM, as a first implementation would do it."""
    net = load_network(model).to(device).eval()
    grabbed = {}
    layer = net.features.norm5

    def hook(module, inputs, output):
        # DenseNet applies ReLU in place after norm5: keep the activations and hand the network a copy.
        grabbed["a"] = output
        output.register_hook(lambda grad: grabbed.__setitem__("g", grad))
        return output.clone()
    layer.register_forward_hook(hook)
    images = films(n)
    x_all = preprocess(images, 224)
    times = []
    for i in range(n):
        x = x_all[i:i + 1].to(device).requires_grad_(True)
        t0 = time.perf_counter()
        net.zero_grad()
        logit = net(x).squeeze()
        logit.backward()
        weights = grabbed["g"].mean(dim=(2, 3), keepdim=True)
        cam = normalize_maps(F.relu((weights * grabbed["a"]).sum(1)).detach())
        float(logit.detach()), cam.cpu()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times[1:])


def limit_table(model: Path, device: torch.device, repeats: int = 3, seconds: float | None = None
                ) -> dict[str, dict[int, float]]:
    """images/s of forward+CAM for each allowed mode and batch size (real films, median of at least `repeats`
    passes and of `seconds` of passes: a few short passes on a shared VM swing by a third; on a GPU, whose passes
    take milliseconds, 1.5 s holds hundreds of them)."""
    seconds = seconds if seconds is not None else (1.5 if device.type == "cuda" else 3.0)
    meta = read_meta(model)
    net = load_network(model)
    table: dict[str, dict[int, float]] = {}
    batches = CUDA_BATCHES if device.type == "cuda" else BATCHES[:5]
    pool = preprocess(films(max(batches)), 224)
    for mode in precision.allowed_modes(device, bf16_allowed=bf16_allowed(meta)):
        precision.prepare(net, device, mode)
        table[mode] = {}
        for b in batches:
            x = pool[:b]
            precision.run(net, x, device, mode)  # warm-up
            times, t_cell = [], time.perf_counter()
            while len(times) < repeats or time.perf_counter() - t_cell < seconds:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                precision.run(net, x, device, mode)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            table[mode][b] = b / statistics.median(times)
    return table


def one_process_ips(model: Path, mode: str, batch: int, threads: int, seconds: float, ready: Path, n: int) -> float:
    """One process of the pool limit: warm up, wait until all `n` processes are ready, then time `seconds` of
    forward+CAM passes in `mode` at `batch` with `threads` torch threads."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    net = load_network(model)
    precision.prepare(net, device, mode)
    x = preprocess(films(batch), 224)
    precision.run(net, x, device, mode)
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < n:
        time.sleep(0.01)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        precision.run(net, x, device, mode)
        done += batch
    return done / (time.perf_counter() - t0)


def pool_limit(model: Path, mode: str, processes: int, batches=(2, 4, 8), seconds: float = 8.0) -> dict[int, float]:
    """images/s of forward+CAM with a worker pool's layout on a CPU: `processes` processes side by side, the
    cores shared out among them as threads; the sum over the processes, per batch size."""
    out = {}
    for b in batches:
        with tempfile.TemporaryDirectory() as ready:
            args = [sys.executable, __file__, "--one-process", mode, str(b),
                    str(threads_per_process(processes)), str(seconds), ready, str(processes), "--model", str(model)]
            procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
            out[b] = sum(float(p.communicate()[0].split()[-1]) for p in procs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--naive", type=int, default=12, help="films for the naive baseline")
    ap.add_argument("--burst", type=int, default=200, help="films in the end-to-end burst (0 skips it)")
    ap.add_argument("--idle", type=int, default=20, help="films dropped one at a time (0 skips it)")
    ap.add_argument("--postgres", help="base URL of a Postgres server (a scratch database is created)")
    ap.add_argument("--redis", help="Redis URL for the Postgres + Redis stack")
    ap.add_argument("--in-place", action="store_true",
                    help="films written straight under their names, not renamed into the inbox: each waits out "
                         "the stability wait")
    ap.add_argument("--precision", default="auto",
                    help="force the service's mode (fp32, bf16, …; as CHESTAID_PRECISION), e.g. fp32 on a bf16 CPU to "
                         "see the figures of a CPU where fp32 is the fastest mode; default: the service's own pick")
    ap.add_argument("--one-process", nargs=6, help=argparse.SUPPRESS)  # internal: one process of pool_limit
    args = ap.parse_args()
    if args.one_process:
        mode, batch, threads, seconds, ready, n = args.one_process
        print(one_process_ips(args.model, mode, int(batch), int(threads), float(seconds), Path(ready), int(n)))
        return
    device = torch.device(args.device)
    print(machine())

    naive = naive_images_per_s(args.model, device, args.naive)
    print(f"\nnaive per-image fp32 forward + autograd Grad-CAM: {naive:.2f} images/s")

    table = limit_table(args.model, device)
    print("\nforward+CAM limit, images/s by batch size:")
    print("mode   " + "".join(f"{b:>9d}" for b in next(iter(table.values()))))
    for mode, row in table.items():
        print(f"{mode:6s} " + "".join(f"{v:9.2f}" for v in row.values()))
    chosen = load_bundle(args.model, device=args.device, mode=args.precision).choice
    best_batch = max(table[chosen.mode], key=table[chosen.mode].get)
    limit = table[chosen.mode][best_batch]
    print(f"service picks: {chosen.label} ({chosen.reason})")
    print(f"one process, {torch.get_num_threads()} threads: {limit:.2f} images/s at batch {best_batch}")
    processes = pool_processes(cuda=device.type == "cuda")
    pool_best = None
    if processes > 1:
        pool = pool_limit(args.model, chosen.mode, processes)
        print(f"{processes} processes × {threads_per_process(processes)} thread(s) at once, images/s by batch: "
              + ", ".join(f"{b}: {v:.2f}" for b, v in pool.items()))
        limit = max(limit, *pool.values())
        pool_best = max(pool, key=pool.get)
    print(f"LIMIT {limit:.2f} images/s (the better layout; the service runs {processes} pool process(es))")

    if args.burst or args.idle:
        import bench_pipeline as bp  # noqa: E402  (same folder)
        stacks = [("embedded", None)] + ([("postgres+redis", args.redis)] if args.postgres and args.redis else [])
        for label, redis in stacks:
            for kind, n, one in (("burst", args.burst, False), ("idle (one film at a time)", args.idle, True)):
                if not n:
                    continue
                env, drop = ({} if args.precision == "auto" else {"CHESTAID_PRECISION": args.precision}), None
                before = None
                if not one and pool_best is not None:  # the machine's speed before this stack starts
                    before = pool_limit(args.model, chosen.mode, processes, batches=(pool_best,))[pool_best]
                if redis:  # a fresh database for each run, so rows of one run never mix with the next
                    url, drop = bp.fresh_postgres(args.postgres)
                    env.update(CHESTAID_DATABASE_URL=url, CHESTAID_BROKER_URL=redis)
                try:
                    r = bp.run(f"{label}: {kind}", n, env, args.model, 0, one_at_a_time=one, in_place=args.in_place)
                finally:
                    if drop:
                        drop()
                if not one:
                    print(f"RATIO {label} burst: service/limit {r['throughput'] / limit:.2f}, "
                          f"service/naive {r['throughput'] / naive:.2f}")
                    if pool_best is not None:
                        # A shared VM's speed drifts by a third within minutes: the pool limit measured again right
                        # after the burst says how much of a ratio is the machine's, not the service's.
                        again = pool_limit(args.model, chosen.mode, processes, batches=(pool_best,))[pool_best]
                        print(f"RATIO {label} burst against the pool limit re-measured right after it "
                              f"({again:.2f} images/s at batch {pool_best}): {r['throughput'] / again:.2f}")
                        # Drift goes both ways within a burst: the mean of the two measurements that bracket it.
                        around = (before + again) / 2
                        print(f"RATIO {label} burst against the pool limit around it ({before:.2f} before, "
                              f"{again:.2f} after, mean {around:.2f}): {r['throughput'] / around:.2f}")


if __name__ == "__main__":
    np.set_printoptions(precision=2)
    main()
