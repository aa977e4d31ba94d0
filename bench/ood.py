"""What the OOD guard adds to forward+CAM: the same batch timed with and without it, on this machine.

    python bench/ood.py [--model models/default] [--batch 16] [--repeats 5] [--threads 1] [--mode auto]

The guard is a Mahalanobis distance (two class means, one 1024×1024 precision) and a 5-way linear probe on the
pooled embedding the forward pass already computed; no second network runs. Prints medians and the ratio.
It asserts nothing: the < 5 % target is judged by reading the figure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from core.films.imaging import load_grayscale  # noqa: E402
from core.ml import precision  # noqa: E402
from core.ml.bundle import load_bundle  # noqa: E402
from core.ml.preprocess import preprocess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "default"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model, mode=args.mode)
    if bundle.ood is None:
        sys.exit(f"{args.model} has no OOD guard")
    films = sorted((REPO / "tests" / "fixtures").glob("*.jpeg"))
    x = preprocess([load_grayscale(films[i % len(films)]) for i in range(args.batch)], bundle.input_size)
    precision.run(bundle.net, x, bundle.device, bundle.mode)  # warm-up
    base, guard, guarded = [], [], []
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        t0 = time.perf_counter()
        precision.run(bundle.net, x, bundle.device, bundle.mode)
        t1 = time.perf_counter()
        logits, _, emb = bundle.forward(x)
        t2 = time.perf_counter()
        bundle.ood.evaluate(emb, logits)
        t3 = time.perf_counter()
        base.append(t1 - t0)
        guarded.append(t3 - t1)
        guard.append(t3 - t2)
    b, g, gg = (statistics.median(v) * 1000 / args.batch for v in (base, guard, guarded))
    print(f"{bundle.choice.label}, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}")
    print(f"forward+CAM              {b:8.2f} ms/image")
    print(f"forward+CAM+embedding+guard {gg:8.2f} ms/image")
    print(f"guard alone (Mahalanobis + probe) {g:8.3f} ms/image = {100 * g / b:.2f} % of forward+CAM")


if __name__ == "__main__":
    main()
