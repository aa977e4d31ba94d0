"""Dataset listing, patient identity and the patient-grouped, stratified split."""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

LABELS = {"NORMAL": 0, "PNEUMONIA": 1}
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    path: Path
    label: int
    patient: str


def patient_id(filename: str) -> str:
    """Returns the patient part of a Kaggle file name (personN / IM-NNNN / NORMAL2-IM-NNNN)."""
    for pattern in (_PERSON, _NORMAL):
        m = pattern.match(filename)
        if m:
            return m.group(1).lower()
    return Path(filename).stem.lower()  # unknown naming: each file its own patient


def list_split(root: Path, split: str) -> list[Item]:
    """Lists <root>/<split>/{NORMAL,PNEUMONIA}/* as labelled items, sorted for reproducibility."""
    items = []
    for name, label in LABELS.items():
        folder = Path(root) / split / name
        if not folder.is_dir():
            raise FileNotFoundError(f"missing folder {folder} (expected Kaggle layout <root>/{split}/NORMAL|PNEUMONIA)")
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(p, label, f"{name}/{patient_id(p.name)}"))
    return items


def grouped_split(items: list[Item], n_folds: int, seed: int) -> tuple[list[Item], list[Item]]:
    """Splits off one of n_folds stratified, patient-grouped folds: returns (rest, held_out)."""
    y = np.array([it.label for it in items])
    groups = np.array([it.patient for it in items])
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    rest_idx, held_idx = next(cv.split(np.zeros(len(y)), y, groups))
    return [items[i] for i in rest_idx], [items[i] for i in held_idx]


def make_splits(root: Path, seed: int = 0) -> dict[str, list[Item]]:
    """Returns train (~6/7), calibration and report halves of validation, carved from Kaggle train."""
    train, val = grouped_split(list_split(root, "train"), n_folds=7, seed=seed)
    calib, report = grouped_split(val, n_folds=2, seed=seed)
    return {"train": train, "calibration": calib, "report": report}


def write_split_file(splits: dict[str, list[Item]], root: Path, path: Path) -> str:
    """Writes split,label,filename,patient rows and returns the file's sha256."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "label", "relpath", "patient"])
        for name, items in splits.items():
            for it in items:
                w.writerow([name, it.label, it.path.relative_to(root).as_posix(), it.patient])
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_split_file(path: Path, root: Path) -> dict[str, list[Item]]:
    """Reads a split file back into items under root."""
    splits: dict[str, list[Item]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            splits.setdefault(row["split"], []).append(Item(Path(root) / row["relpath"], int(row["label"]), row["patient"]))
    return splits
