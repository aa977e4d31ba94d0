"""The shift suite: validation films under controlled perturbations that model other hospitals and devices.

In-distribution validation cannot tell a model that generalises from one that memorised the training
hospital, so training selects checkpoints on this suite and `chestaid evaluate --shift` reports it.

Every perturbation acts on the 8-bit grayscale film exactly as the service sees it after decoding
(`core.films.imaging.load_grayscale`, a PIL image in mode ``L`` at the film's own size), before
`core.ml.preprocess`. Sizes (blur radius, border width, text height) are given for a film with a 256 px short
side, the size of the data set's films, and scale with the film. Each one is deterministic given a seed and
the film's index, and keeps the label: it changes how the film was acquired or stored, never the chest.

Families marked ``held_out`` are never used by training augmentation (training.augment), so the suite also
measures generalisation to shifts the network was not trained on.
"""
from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from sklearn.metrics import roc_auc_score

from core.ml.preprocess import INPUT_SIZE, resize_gray

# family -> (what it models, held out of training augmentation?)
FAMILIES: dict[str, tuple[str, bool]] = {
    "contrast": ("gamma and contrast curves of another detector or look-up table", False),
    "brightness": ("exposure / window level offset", False),
    "blur": ("softer detector, motion, heavier anti-scatter grid", False),
    "noise": ("low-dose quantum noise", False),
    "geometry": ("zoom, off-centre cropping and translation of the patient on the detector", False),
    "sharpen": ("edge enhancement applied by the vendor's processing", True),
    "jpeg": ("lossy re-compression by a PACS or export tool", True),
    "resample": ("lower native resolution, up-sampled for display", True),
    "borders": ("letterbox padding and bright collimation edges", True),
    "text": ("burned-in side markers and annotation text", True),
}
HELD_OUT_FAMILIES = tuple(f for f, (_, held) in FAMILIES.items() if held)


@dataclass(frozen=True)
class Perturbation:
    """One named, documented perturbation of a uint8 grayscale film."""

    name: str
    family: str
    description: str
    fn: Callable[[Image.Image, np.random.Generator], Image.Image]

    @property
    def held_out(self) -> bool:
        """True when this perturbation's family is kept out of training augmentation."""
        return FAMILIES[self.family][1]


def _scale(img: Image.Image) -> float:
    """Film size relative to the 256 px short side the perturbation sizes are given for."""
    return min(img.size) / 256.0


def _lut(img: Image.Image, fn: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """Applies a grey-level curve through a 256-entry look-up table (rounded, clipped to 0..255)."""
    table = np.clip(np.rint(fn(np.arange(256, dtype=np.float64))), 0, 255).astype(np.uint8)
    return img.point(table.tolist())


def _gamma(g: float):
    return lambda img, rng: _lut(img, lambda v: 255.0 * (v / 255.0) ** g)


def _contrast(factor: float):
    def fn(img, rng):
        mean = float(np.asarray(img, dtype=np.float64).mean())  # about the film's own mean grey
        return _lut(img, lambda v: mean + factor * (v - mean))
    return fn


def _brightness(offset: int):
    return lambda img, rng: _lut(img, lambda v: v + offset)


def _blur(sigma: float):
    return lambda img, rng: img.filter(ImageFilter.GaussianBlur(radius=sigma * _scale(img)))


def _sharpen(img, rng):
    return img.filter(ImageFilter.UnsharpMask(radius=2.0 * _scale(img), percent=150, threshold=0))


def _noise(sigma: float):
    def fn(img, rng):
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr + rng.normal(0.0, sigma, arr.shape)), 0, 255).astype(np.uint8))
    return fn


def _jpeg(quality: int):
    def fn(img, rng):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as out:
            return out.convert("L")
    return fn


def _resample(factor: float):
    def fn(img, rng):
        w, h = img.size
        small = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BOX)
        return small.resize((w, h), Image.BICUBIC)
    return fn


def _crop(fraction: float, centred: bool):
    def fn(img, rng):
        w, h = img.size
        cw, ch = round(w * fraction), round(h * fraction)
        if centred:
            x0, y0 = (w - cw) // 2, (h - ch) // 2
        else:  # one of the four corners, chosen by the seeded generator
            x0, y0 = (w - cw) * int(rng.integers(2)), (h - ch) * int(rng.integers(2))
        return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    return fn


def _translate(fraction: float):
    def fn(img, rng):
        w, h = img.size
        dx = round(w * fraction) * (1 if rng.integers(2) else -1)
        dy = round(h * fraction) * (1 if rng.integers(2) else -1)
        out = Image.new("L", (w, h), 0)  # the uncovered detector area is black
        out.paste(img, (dx, dy))
        return out
    return fn


def _pad(fraction: float):
    def fn(img, rng):
        w, h = img.size
        px, py = round(w * fraction), round(h * fraction)
        out = Image.new("L", (w + 2 * px, h + 2 * py), 0)
        out.paste(img, (px, py))
        return out
    return fn


def _collimation(img, rng):
    w, h = img.size
    arr = np.array(img)
    left, right = (int(round(w * f)) for f in rng.uniform(0.05, 0.12, 2))
    top, bottom = (int(round(h * f)) for f in rng.uniform(0.05, 0.12, 2))
    level = int(rng.integers(215, 251))  # unexposed, shuttered film is bright
    arr[:top, :], arr[h - bottom:, :] = level, level
    arr[:, :left], arr[:, w - right:] = level, level
    return Image.fromarray(arr)


def _text(img, rng):
    out = img.copy()
    draw = ImageDraw.Draw(out)
    s = _scale(img)
    font = ImageFont.load_default(size=max(8, round(18 * s)))
    w, h = img.size
    margin = round(8 * s)
    side = "R" if rng.integers(2) else "L"
    x = margin if rng.integers(2) else w - margin - round(22 * s)
    draw.rectangle((x - 2, margin - 2, x + round(20 * s), margin + round(22 * s)), outline=255, width=max(1, round(s)))
    draw.text((x + round(3 * s), margin), side, fill=255, font=font)
    stamp = f"PORTABLE AP  {int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
    draw.text((margin, h - margin - round(20 * s)), stamp, fill=255, font=font)
    return out


PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("gamma_0.6", "contrast", "grey levels v -> 255*(v/255)^0.6 (brighter mid-tones)", _gamma(0.6)),
    Perturbation("gamma_1.6", "contrast", "grey levels v -> 255*(v/255)^1.6 (darker mid-tones)", _gamma(1.6)),
    Perturbation("contrast_0.6", "contrast", "contrast scaled by 0.6 about the film's mean grey", _contrast(0.6)),
    Perturbation("contrast_1.5", "contrast", "contrast scaled by 1.5 about the film's mean grey (clipped)",
                 _contrast(1.5)),
    Perturbation("brightness_+40", "brightness", "+40 grey levels (clipped)", _brightness(40)),
    Perturbation("brightness_-40", "brightness", "-40 grey levels (clipped)", _brightness(-40)),
    Perturbation("blur_1.5", "blur", "Gaussian blur, sigma 1.5 px", _blur(1.5)),
    Perturbation("sharpen", "sharpen", "unsharp mask, radius 2 px, 150 %", _sharpen),
    Perturbation("noise_12", "noise", "additive Gaussian noise, sd 12 grey levels", _noise(12.0)),
    Perturbation("jpeg_q20", "jpeg", "JPEG re-compression at quality 20", _jpeg(20)),
    Perturbation("resample_0.33", "resample", "box down-sampling to 1/3 size, bicubic back up", _resample(1 / 3)),
    Perturbation("zoom_0.8", "geometry", "central 80 % crop, resized back (zoom in 1.25x)", _crop(0.8, True)),
    Perturbation("corner_crop_0.85", "geometry", "85 % crop at a random corner, resized back", _crop(0.85, False)),
    Perturbation("translate_0.08", "geometry", "shifted by 8 % of width and height in a random direction, "
                 "black fill", _translate(0.08)),
    Perturbation("pad_0.12", "borders", "black letterbox border of 12 % on every side", _pad(0.12)),
    Perturbation("collimation", "borders", "bright collimation edges of 5-12 % on each side", _collimation),
    Perturbation("text_markers", "text", "burned-in boxed side marker and a 'PORTABLE AP hh:mm' stamp", _text),
)
BY_NAME = {p.name: p for p in PERTURBATIONS}


def apply(p: Perturbation, img: Image.Image, *, seed: int, index: int) -> Image.Image:
    """Returns the perturbed film: mode L, deterministic given (seed, perturbation, film index)."""
    if img.mode != "L":
        raise ValueError(f"the shift suite perturbs 8-bit grayscale films (mode L), got mode {img.mode}")
    rng = np.random.default_rng([seed, zlib.crc32(p.name.encode()), index])
    out = p.fn(img, rng)
    if out.mode != "L":
        raise AssertionError(f"perturbation {p.name} returned mode {out.mode}")
    return out


def perturbed_arrays(p: Perturbation | None, films: Sequence[Image.Image], *, seed: int,
                     size: int = INPUT_SIZE) -> np.ndarray:
    """Returns uint8 [N,size,size]: each film perturbed (None: clean), then the service's resize."""
    return np.stack([resize_gray(img if p is None else apply(p, img, seed=seed, index=i), size)
                     for i, img in enumerate(films)])


def seeded_subset(labels: Sequence[int], n: int, seed: int) -> np.ndarray:
    """Indices of a fixed, class-stratified subset of n films (all when n <= 0 or n >= len), sorted."""
    y = np.asarray(labels)
    if n <= 0 or n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        k = max(1, round(n * len(idx) / len(y)))
        keep.extend(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.array(keep))


def summarize(clean_auc: float, aucs: dict[str, float]) -> dict:
    """Turns per-perturbation ROC-AUCs into the suite's figures: table, mean, worst, held-out and trained means."""
    held = [v for k, v in aucs.items() if BY_NAME[k].held_out]
    trained = [v for k, v in aucs.items() if not BY_NAME[k].held_out]
    worst = min(aucs, key=aucs.get)
    return {
        "clean_roc_auc": float(clean_auc),
        "mean_roc_auc": float(np.mean(list(aucs.values()))),
        "worst": {"perturbation": worst, "roc_auc": float(aucs[worst])},
        "mean_held_out": float(np.mean(held)) if held else None,
        "mean_in_training_augmentation": float(np.mean(trained)) if trained else None,
        "held_out_families": list(HELD_OUT_FAMILIES),
        "per_perturbation": {k: {"family": BY_NAME[k].family, "held_out": BY_NAME[k].held_out,
                                 "description": BY_NAME[k].description, "roc_auc": float(v),
                                 "delta_vs_clean": float(v - clean_auc)} for k, v in aucs.items()},
    }


def run_suite(predict: Callable[[np.ndarray], np.ndarray], films: Sequence[Image.Image], labels: Sequence[int], *,
              seed: int = 0, perturbations: Sequence[Perturbation] = PERTURBATIONS, progress=None) -> dict:
    """Scores clean and perturbed films with predict(uint8 [N,224,224]) -> logits and summarises ROC-AUCs."""
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        raise ValueError("the shift suite needs films of both classes to compute ROC-AUC")
    clean = roc_auc_score(y, predict(perturbed_arrays(None, films, seed=seed)))
    aucs = {}
    for p in perturbations:
        aucs[p.name] = float(roc_auc_score(y, predict(perturbed_arrays(p, films, seed=seed))))
        if progress:
            progress(p.name, aucs[p.name])
    return summarize(clean, aucs)


def markdown_table(summary: dict) -> str:
    """Renders a suite summary as the Markdown table printed by `chestaid evaluate --shift`."""
    lines = ["| perturbation | family | held out of training augmentation | ROC-AUC | Δ vs clean |",
             "|---|---|---|---|---|",
             f"| clean | — | — | {summary['clean_roc_auc']:.4f} | — |"]
    for name, r in summary["per_perturbation"].items():
        lines.append(f"| {name} | {r['family']} | {'yes' if r['held_out'] else 'no'} | {r['roc_auc']:.4f} "
                     f"| {r['delta_vs_clean']:+.4f} |")
    w, clean = summary["worst"], summary["clean_roc_auc"]
    lines += [f"| **mean** | | | **{summary['mean_roc_auc']:.4f}** | {summary['mean_roc_auc'] - clean:+.4f} |",
              f"| **worst** ({w['perturbation']}) | | | **{w['roc_auc']:.4f}** | {w['roc_auc'] - clean:+.4f} |"]
    if summary["mean_held_out"] is not None:
        lines.append(f"| mean, held-out families | | yes | {summary['mean_held_out']:.4f} | |")
    if summary["mean_in_training_augmentation"] is not None:
        lines.append(f"| mean, augmented families | | no | {summary['mean_in_training_augmentation']:.4f} | |")
    return "\n".join(lines)


def suite_arrays(films: Sequence[Image.Image], *, seed: int, size: int = INPUT_SIZE) -> np.ndarray:
    """Returns uint8 [P,N,size,size]: every film under every perturbation, in PERTURBATIONS order (training cache)."""
    return np.stack([perturbed_arrays(p, films, seed=seed, size=size) for p in PERTURBATIONS])


def summarize_arrays(predict: Callable[[np.ndarray], np.ndarray], arrays: np.ndarray, labels: Sequence[int],
                     clean_auc: float) -> dict:
    """Summarises the suite from suite_arrays' output, scoring each perturbation with predict."""
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        raise ValueError("the shift suite needs films of both classes to compute ROC-AUC")
    return summarize(clean_auc, {p.name: float(roc_auc_score(y, predict(arrays[k])))
                                 for k, p in enumerate(PERTURBATIONS)})
