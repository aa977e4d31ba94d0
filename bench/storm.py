"""The intake storm at full size: N files (default 1,000) of which 10% corrupt or truncated, 5% empty, 5%
written slowly, 5% duplicates, 5% same-name replacements, a few links and one poison film, dropped as fast as
possible into a live stack while workers are SIGKILLed twice, Redis (redis stack) and the ingester restarted.

Usage:
    python bench/storm.py --n 1000 --stack embedded|redis|both [--postgres URL] [--workers 2] [--keep]
Prints files dropped, accounted, lost (must be 0), double-scored (must be 0), time to drain, throughput and
every violated property; exits 1 if any. The model is a small random-init bundle (scoring speed, not accuracy).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import POSTGRES_URL, make_bundle  # noqa: E402
from tests.storm_lib import POISON_MARKER, run_storm  # noqa: E402
from tests.storm_stack import StormStack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="files to drop (at least 20)")
    ap.add_argument("--stack", choices=["embedded", "redis", "both"], default="both")
    ap.add_argument("--postgres", default=POSTGRES_URL, help="base URL of a Postgres server (a scratch database "
                    "is created and dropped)")
    ap.add_argument("--workers", type=int, default=2, help="Celery worker processes (each -c 1)")
    ap.add_argument("--stable-seconds", type=float, default=0.4)
    ap.add_argument("--requeue-after", type=int, default=10, help="CHESTAID_REQUEUE_AFTER_SECONDS")
    ap.add_argument("--drain-timeout", type=float, default=None, help="seconds (default 120 + 2 per file)")
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, archive) for inspection")
    args = ap.parse_args()
    stacks = ["embedded", "redis"] if args.stack == "both" else [args.stack]
    work = Path(tempfile.mkdtemp(prefix="chestaid-storm-"))
    failed = False
    try:
        bundle = make_bundle(work / "bundle")
        for kind in stacks:
            with StormStack(kind, work / kind, bundle_dir=bundle, postgres_url=args.postgres,
                            stable_seconds=args.stable_seconds, requeue_after_seconds=args.requeue_after,
                            poison_marker=POISON_MARKER) as stack:
                report = run_storm(stack, n=args.n, seed=args.seed, workers=args.workers,
                                   drain_timeout=args.drain_timeout or 120 + 2 * args.n)
            print(report.summary(), flush=True)
            failed |= bool(report.violations)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
