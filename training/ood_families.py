"""The OOD evaluation set, synthesised on the spot (never downloaded): pictures Chest-Aid must refuse.

Each family is a function (rng, n) → n 8-bit grayscale PIL images of varied size. They imitate what lands in
an inbox by mistake: cross-sectional slices (CT, MR) exported as PNG, radiographs of other body parts,
scanned text documents and forms, plain gradients, checkerboards and stripes, noise textures and
photograph-like scenes. Rotated and inverted chest films are made from real validation films elsewhere
(training.ood.variant), since they need the data.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


def _size(rng) -> tuple[int, int]:
    return int(rng.integers(256, 640)), int(rng.integers(256, 640))


def _finish(img: Image.Image, rng, blur: float = 1.0, noise: float = 6.0) -> Image.Image:
    """Blurs a little and adds sensor-like noise so no two images are clean copies of a template."""
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    arr = arr + rng.normal(0, noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def _ellipse(draw, cx, cy, rx, ry, fill):
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(fill))


def ct_slice(rng, n: int) -> list[Image.Image]:
    """Axial chest CT slices in a lung/soft-tissue window: round body, dark lungs, bright spine and ribs."""
    out = []
    for _ in range(n):
        s = int(rng.integers(256, 512))
        img = Image.new("L", (s, s), 0)
        d = ImageDraw.Draw(img)
        cx, cy = s / 2, s / 2 + rng.uniform(-10, 10)
        rx, ry = s * rng.uniform(0.38, 0.46), s * rng.uniform(0.28, 0.36)
        _ellipse(d, cx, cy, rx, ry, rng.uniform(90, 130))
        for side in (-1, 1):
            _ellipse(d, cx + side * rx * 0.45, cy - ry * 0.05, rx * 0.33, ry * 0.62, rng.uniform(5, 30))
        _ellipse(d, cx, cy + ry * 0.7, rx * 0.09, ry * 0.12, 240)  # vertebra
        _ellipse(d, cx - rx * 0.05, cy - ry * 0.1, rx * 0.12, ry * 0.18, rng.uniform(130, 170))  # heart
        for a in np.linspace(0.2, np.pi - 0.2, int(rng.integers(6, 10))):  # rib cross-sections
            _ellipse(d, cx + rx * 0.93 * np.cos(a), cy + ry * 0.93 * np.sin(a), 4, 4, 230)
            _ellipse(d, cx + rx * 0.93 * np.cos(a), cy - ry * 0.93 * np.sin(a), 4, 4, 230)
        out.append(_finish(img, rng, 1.2, 8))
    return out


def mr_slice(rng, n: int) -> list[Image.Image]:
    """Axial head MR-like slices: bright skull rim, grey matter texture, dark ventricles."""
    out = []
    for _ in range(n):
        s = int(rng.integers(256, 512))
        tex = rng.normal(0, 1, (s // 8, s // 8))
        tex = np.asarray(Image.fromarray(((tex - tex.min()) / np.ptp(tex) * 255).astype(np.uint8)).resize((s, s),
                         Image.BICUBIC), dtype=np.float32)
        img = Image.new("L", (s, s), 0)
        d = ImageDraw.Draw(img)
        rx, ry = s * rng.uniform(0.33, 0.42), s * rng.uniform(0.4, 0.46)
        _ellipse(d, s / 2, s / 2, rx, ry, 200)
        _ellipse(d, s / 2, s / 2, rx * 0.9, ry * 0.92, 110)
        for side in (-1, 1):
            _ellipse(d, s / 2 + side * rx * 0.12, s / 2, rx * 0.08, ry * 0.25, 20)
        arr = np.asarray(img, dtype=np.float32)
        arr = np.where((arr > 50) & (arr < 150), arr + 0.3 * (tex - 128), arr)
        out.append(_finish(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), rng, 1.5, 5))
    return out


def extremity_radiograph(rng, n: int) -> list[Image.Image]:
    """Hand, forearm or knee radiographs: soft-tissue silhouette with bright long bones and joint gaps."""
    out = []
    for _ in range(n):
        w, h = _size(rng)
        img = Image.new("L", (w, h), int(rng.uniform(0, 30)))
        d = ImageDraw.Draw(img)
        bones = int(rng.integers(1, 6))
        xs = np.linspace(w * 0.25, w * 0.75, bones)
        d.rounded_rectangle([w * 0.15, h * 0.05, w * 0.85, h * 0.95], radius=int(w * 0.15),
                            fill=int(rng.uniform(60, 100)))
        for x in xs:
            bw = w * rng.uniform(0.04, 0.1) / max(1, bones / 2)
            y = h * 0.05
            while y < h * 0.9:
                seg = h * rng.uniform(0.15, 0.4)
                end = min(y + seg, h * 0.95)
                d.rounded_rectangle([x - bw, y, x + bw, end], radius=int(bw), fill=int(rng.uniform(190, 245)))
                if end - y > 3 * bw:  # medullary canal, only where the segment is long enough to show one
                    d.rounded_rectangle([x - bw * 0.45, y + bw, x + bw * 0.45, end - bw],
                                        radius=int(bw * 0.4), fill=int(rng.uniform(140, 180)))
                y += seg + h * rng.uniform(0.01, 0.03)
        out.append(_finish(img, rng, 1.5, 7))
    return out


def document(rng, n: int) -> list[Image.Image]:
    """Scanned request forms and letters: white page, lines of text, boxes and rules."""
    font = ImageFont.load_default()
    words = ["Patient", "Request", "Chest", "X-ray", "Date", "Ward", "Signature", "Clinical", "history",
             "cough", "fever", "Referral", "Dr.", "Department", "of", "Radiology", "urgent", "Name", "DOB"]
    out = []
    for _ in range(n):
        w, h = _size(rng)
        img = Image.new("L", (w, h), int(rng.uniform(215, 255)))
        d = ImageDraw.Draw(img)
        y = int(rng.integers(10, 30))
        while y < h - 20:
            if rng.random() < 0.2:
                d.rectangle([20, y, w - 20, y + 30], outline=int(rng.uniform(0, 80)))
                y += 40
                continue
            line = " ".join(rng.choice(words, int(rng.integers(3, 12))))
            d.text((int(rng.integers(10, 40)), y), line, fill=int(rng.uniform(0, 90)), font=font)
            y += int(rng.integers(14, 26))
        out.append(_finish(img, rng, 0.6, 4))
    return out


def _shade(m: np.ndarray, rng, *, noise: float) -> Image.Image:
    """Maps a 0..1 (or boolean) map onto a random grey range and finishes it (light blur, `noise`)."""
    lo, hi = sorted(rng.uniform(0, 255, 2))
    return _finish(Image.fromarray((lo + m * (hi - lo)).astype(np.uint8)), rng, 0.5, noise)


def gradient(rng, n: int) -> list[Image.Image]:
    """Plain linear or radial grey gradients (test patterns, blank exports)."""
    out = []
    for _ in range(n):
        w, h = _size(rng)
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        if rng.random() < 0.5:
            a = rng.uniform(0, 2 * np.pi)
            g = np.cos(a) * xx + np.sin(a) * yy
        else:
            g = np.hypot(xx - rng.uniform(0, 1), yy - rng.uniform(0, 1))
        g = (g - g.min()) / (np.ptp(g) + 1e-9)
        out.append(_shade(g, rng, noise=2))
    return out


def pattern(rng, n: int) -> list[Image.Image]:
    """Checkerboards, stripes and grids at random scales and contrasts."""
    out = []
    for _ in range(n):
        w, h = _size(rng)
        yy, xx = np.mgrid[0:h, 0:w]
        p = int(rng.integers(8, 64))
        kind = rng.integers(0, 3)
        if kind == 0:
            m = ((xx // p) + (yy // p)) % 2
        elif kind == 1:
            a = rng.uniform(0, np.pi)
            m = (np.floor((np.cos(a) * xx + np.sin(a) * yy) / p) % 2)
        else:
            m = ((xx % p) < 2) | ((yy % p) < 2)
        out.append(_shade(m, rng, noise=3))
    return out


def noise_texture(rng, n: int) -> list[Image.Image]:
    """Smooth random textures (clouds, fabric, film grain) at several spatial scales."""
    out = []
    for _ in range(n):
        w, h = _size(rng)
        f = int(rng.integers(2, 40))
        base = rng.normal(0, 1, (max(2, h // f), max(2, w // f)))
        base = (base - base.min()) / np.ptp(base) * 255
        img = Image.fromarray(base.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        out.append(_finish(img, rng, rng.uniform(0.5, 3), rng.uniform(2, 20)))
    return out


def photo_like(rng, n: int) -> list[Image.Image]:
    """Grayscale photograph-like scenes: sky gradient, horizon, shaded objects of many sizes."""
    out = []
    for _ in range(n):
        w, h = _size(rng)
        yy = np.linspace(rng.uniform(150, 255), rng.uniform(60, 160), h)[:, None] * np.ones((1, w))
        img = Image.fromarray(yy.astype(np.uint8))
        d = ImageDraw.Draw(img)
        horizon = int(h * rng.uniform(0.4, 0.7))
        d.rectangle([0, horizon, w, h], fill=int(rng.uniform(30, 120)))
        for _ in range(int(rng.integers(4, 15))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(5, min(w, h) / 4)
            if rng.random() < 0.5:
                _ellipse(d, cx, cy, r, r * rng.uniform(0.5, 1.5), rng.uniform(0, 255))
            else:
                pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.sort(rng.uniform(0, 6.28, 5))]
                d.polygon(pts, fill=int(rng.uniform(0, 255)))
        out.append(_finish(img, rng, rng.uniform(0.8, 2), 5))
    return out


FAMILIES: dict[str, Callable] = {
    "ct_slice": ct_slice, "mr_slice": mr_slice, "extremity_radiograph": extremity_radiograph,
    "document": document, "gradient": gradient, "pattern": pattern, "noise_texture": noise_texture,
    "photo_like": photo_like,
}


def synthesise(n_per_family: int, seed: int = 0) -> dict[str, list[Image.Image]]:
    """Returns n images of every synthetic family, deterministic for a seed."""
    return {name: fn(np.random.default_rng([seed, i]), n_per_family) for i, (name, fn) in enumerate(FAMILIES.items())}
