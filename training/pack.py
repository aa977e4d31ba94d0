"""Packs a split's films small enough to travel to a GPU machine: the service's own 224×224 resize, JPEG quality 85.

A lent GPU machine takes a working tree of at most 64 MiB; the Kaggle-layout films (66 MB at a 256 px shorter
side) do not fit, their 224×224 JPEG q85 re-encodings (about 38 MB) do. The packed folder keeps every film's
relative path, so the run's split.csv reads it unchanged (`chestaid train --data <packed>`), and resizing a
packed film again is the identity. The re-encoding is a mild JPEG step on top of the training augmentation;
runs trained on a pack are still scored by `chestaid compare-runs` on the original films.

    python -m training.pack --split models/default/split.csv --data ../shared/data/chest_xray --out .pack
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from core.films.imaging import load_grayscale
from core.ml.preprocess import resize_gray
from training.data import read_split_file

QUALITY = 85


def pack(split_file: Path, data_root: Path, out: Path, quality: int = QUALITY) -> dict:
    """Writes every film of split_file under out at its relative path; returns counts and bytes written."""
    splits = read_split_file(split_file, data_root)
    n, size = 0, 0
    for items in splits.values():
        for it in items:
            target = out / it.path.relative_to(data_root)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(resize_gray(load_grayscale(it.path))).save(target, format="JPEG", quality=quality)
            n, size = n + 1, size + target.stat().st_size
    shutil.copyfile(split_file, out / "split.csv")
    return {"films": n, "bytes": size}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="split.csv naming the films (a bundle's or a run's)")
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout root the split's paths are under")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quality", type=int, default=QUALITY)
    args = parser.parse_args()
    done = pack(args.split, args.data, args.out, args.quality)
    print(f"packed {done['films']} films, {done['bytes'] / 1e6:.1f} MB, into {args.out}")
