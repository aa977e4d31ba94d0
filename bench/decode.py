"""What decoding a hospital-size film costs a pool process: load_grayscale + the model's resize, by format.

    python bench/decode.py [--size 2500x2048] [--repeats 7] [--without python-gdcm pyjpegls pylibjpeg-rle]

A 256-px training film (what bench/speed.py drops) decodes in under a millisecond; a modality's film is
2,000–3,000 px a side, 12 bits, and often DICOM. Each film here is a fixture film scaled up to --size with a
little noise (so it compresses like a real one), saved in each format the service takes; each is decoded
--repeats times and the median CPU time of the process (all its threads) is printed. It asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom import uid  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402

from core.films.imaging import load_grayscale  # noqa: E402
from core.ml.preprocess import resize_gray  # noqa: E402
from core.ml.precision import describe_cpu  # noqa: E402

from tests.dicom_samples import compressed, make_dataset, to_bytes  # noqa: E402

try:
    from core.films.dicom_pixels import preferred_plugin
except ImportError:  # the code before per-syntax decoders, for before/after runs: pydicom's own order
    def preferred_plugin(syntax):
        return None

# --without PACKAGE: the pydicom plugins that package provides, and the syntaxes it provides them for (None: all).
PACKAGES = {"python-gdcm": ("gdcm", None), "pyjpegls": ("pyjpegls", None),
            "pylibjpeg-rle": ("pylibjpeg", {uid.RLELossless})}
COMPRESSED = (uid.RLELossless, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
              uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000)


def decode_without(packages: list[str]) -> None:
    """Makes pydicom decode as if `packages` were not installed (they stay importable: the samples need them to
    encode), e.g. the decoders pyproject shipped before python-gdcm, pyjpegls and pylibjpeg-rle."""
    for syntax in COMPRESSED:
        decoder = get_decoder(syntax)
        decoder.available_plugins  # noqa: B018 (loads the plugins, so that they can be dropped)
        for package in packages:
            plugin, syntaxes = PACKAGES[package]
            if syntaxes is None or syntax in syntaxes:
                decoder._available.pop(plugin, None)


def films(width: int, height: int) -> dict[str, bytes]:
    """The same film as JPEG, 8- and 16-bit PNG, 12-bit DICOM (uncompressed, RLE, JPEG Lossless, JPEG-LS, JPEG 2000)
    and 8-bit DICOM in baseline JPEG."""
    base = sorted((REPO / "tests" / "fixtures").glob("*.jpeg"))[0]
    up = np.asarray(Image.open(base).convert("L").resize((width, height), Image.BICUBIC), dtype=np.float64)
    twelve = np.clip(up * 16 + np.random.default_rng(0).normal(0, 12, up.shape), 0, 4095).astype(np.uint16)
    eight = (twelve >> 4).astype(np.uint8)
    out = {}
    for name, img, kw in [("JPEG q90", Image.fromarray(eight), dict(format="JPEG", quality=90)),
                          ("PNG 8-bit", Image.fromarray(eight), dict(format="PNG")),
                          ("PNG 16-bit", Image.fromarray(twelve * 16), dict(format="PNG"))]:
        buf = io.BytesIO()
        img.save(buf, **kw)
        out[name] = buf.getvalue()
    for name, syntax in [("DICOM uncompressed", None), ("DICOM RLE", uid.RLELossless),
                         ("DICOM JPEG Lossless", uid.JPEGLosslessSV1), ("DICOM JPEG-LS", uid.JPEGLSLossless),
                         ("DICOM JPEG 2000", uid.JPEG2000Lossless)]:
        ds = make_dataset(twelve, modality="DX", bits_stored=12, WindowCenter=2048, WindowWidth=4096)
        out[name] = to_bytes(compressed(ds, syntax) if syntax else ds)
    out["DICOM JPEG baseline"] = to_bytes(compressed(make_dataset(eight, modality="DX"), uid.JPEGBaseline8Bit))
    return out


def cpu_ms(fn, repeats: int) -> float:
    """Median CPU ms of the whole process, every thread: a decoder may run its own threads (gdcm's JPEG 2000 does),
    and in a busy pool those take the cores the forward pass runs on."""
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2500x2048", help="film width x height in pixels")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--without", nargs="*", default=[], choices=sorted(PACKAGES),
                    help="decode as if these packages were not installed")
    args = ap.parse_args()
    decode_without(args.without)
    width, height = (int(v) for v in args.size.lower().split("x"))
    print(f"cpu: {describe_cpu()}")
    print(f"film {width}x{height}; CPU ms of the process (all threads), median of {args.repeats}")
    print(f"{'format':22s} {'size KB':>8s} {'decode':>8s} {'+ resize':>9s}")
    for name, data in films(width, height).items():
        decode = cpu_ms(lambda: load_grayscale(data), args.repeats)
        both = cpu_ms(lambda: resize_gray(load_grayscale(data)), args.repeats)
        syntax = pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID if name.startswith("DICOM") else None
        plugin = preferred_plugin(syntax) if syntax else None
        print(f"{name:22s} {len(data) // 1024:8d} {decode:8.1f} {both:9.1f}" + (f"  ({plugin})" if plugin else ""))


if __name__ == "__main__":
    main()
