"""Speed against the naive baseline, in one process tree on one machine, so the ratios are honest.

Prints, for the bundle (default: the shipped one):
1. the CPU/GPU, its flags and torch's view of it (every figure belongs to a machine);
2. the naive baseline: per-image fp32 forward + autograd Grad-CAM with hooks at features.norm5;
3. the forward+CAM limit of each allowed precision at batch sizes 1…64, and the mode the service picks;
4. the service end to end (bench/bench_pipeline.py's runner): a burst of films dropped into the inbox, on
   embedded defaults and, with --postgres/--redis, on Postgres + Redis; and the same one film at a time;
5. the ratios service ÷ limit and service ÷ naive.

    python bench/speed.py [--burst 200] [--idle 20] [--postgres URL --redis URL] [--model DIR] [--device cuda]

It asserts nothing: targets are judged by reading the figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
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

BATCHES = (1, 2, 4, 8, 16, 32, 64)


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


def limit_table(model: Path, device: torch.device, repeats: int = 3) -> dict[str, dict[int, float]]:
    """images/s of forward+CAM for each allowed mode and batch size (real films, median of repeats)."""
    meta = read_meta(model)
    net = load_network(model)
    table: dict[str, dict[int, float]] = {}
    batches = BATCHES if device.type == "cuda" else BATCHES[:5]
    pool = preprocess(films(max(batches)), 224)
    for mode in precision.allowed_modes(device, bf16_allowed=bf16_allowed(meta)):
        precision.prepare(net, device, mode)
        table[mode] = {}
        for b in batches:
            x = pool[:b]
            precision.run(net, x, device, mode)  # warm-up
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                precision.run(net, x, device, mode)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            table[mode][b] = b / statistics.median(times)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--naive", type=int, default=12, help="films for the naive baseline")
    ap.add_argument("--burst", type=int, default=200, help="films in the end-to-end burst (0 skips it)")
    ap.add_argument("--idle", type=int, default=20, help="films dropped one at a time (0 skips it)")
    ap.add_argument("--postgres", help="base URL of a Postgres server (a scratch database is created)")
    ap.add_argument("--redis", help="Redis URL for the Postgres + Redis stack")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(machine())

    naive = naive_images_per_s(args.model, device, args.naive)
    print(f"\nnaive per-image fp32 forward + autograd Grad-CAM: {naive:.2f} images/s")

    table = limit_table(args.model, device)
    print("\nforward+CAM limit, images/s by batch size:")
    print("mode   " + "".join(f"{b:>9d}" for b in next(iter(table.values()))))
    for mode, row in table.items():
        print(f"{mode:6s} " + "".join(f"{v:9.2f}" for v in row.values()))
    chosen = load_bundle(args.model, device=args.device).choice
    best_batch = max(table[chosen.mode], key=table[chosen.mode].get)
    limit = table[chosen.mode][best_batch]
    print(f"service picks: {chosen.label} ({chosen.reason}); limit {limit:.2f} images/s at batch {best_batch}")

    if args.burst or args.idle:
        import bench_pipeline as bp  # noqa: E402  (same folder)
        stacks = [("embedded", None)] + ([("postgres+redis", args.redis)] if args.postgres and args.redis else [])
        for label, redis in stacks:
            for kind, n, one in (("burst", args.burst, False), ("idle (one film at a time)", args.idle, True)):
                if not n:
                    continue
                env, drop = {}, None
                if redis:  # a fresh database for each run, so rows of one run never mix with the next
                    url, drop = bp.fresh_postgres(args.postgres)
                    env = {"CHESTAID_DATABASE_URL": url, "CHESTAID_BROKER_URL": redis}
                try:
                    r = bp.run(f"{label}: {kind}", n, env, args.model, 1, one_at_a_time=one)
                finally:
                    if drop:
                        drop()
                if not one:
                    print(f"RATIO {label} burst: service/limit {r['throughput'] / limit:.2f}, "
                          f"service/naive {r['throughput'] / naive:.2f}")


if __name__ == "__main__":
    np.set_printoptions(precision=2)
    main()
