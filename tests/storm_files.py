"""The storm's files: a seeded plan of what is dropped (good films, corrupt, empty, slow, duplicate, replaced,
symbolic links, one poison film) and the dropper that puts them into a live inbox as fast as it can.

Shared by tests/test_storm.py (small N) and bench/storm.py (N = 1,000). Every dropped file is one manifest
Entry; the audit (tests/storm_lib.py) maps each entry to exactly one study row by (sha256, source name).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import fixture_images

SIDE = 256  # films are downscaled to this width so a random-init DenseNet scores them quickly on CPU
# Where the storm's symbolic links point: a secret-ish regular file, an endless device, and nothing at all.
LINK_TARGETS = ("/etc/passwd", "/dev/zero", "/nonexistent/chestaid-storm-target")


@dataclass
class Entry:
    """One dropped file (or link): what the manifest knows about it."""

    name: str
    kind: str  # film | corrupt | empty | slow | duplicate | replacement | symlink | poison
    data: bytes = b""
    link_target: str = ""
    replaces: str = ""  # replacement: the name it is renamed onto, once that file was taken
    copy_of: str = ""  # duplicate: the name of the film whose bytes it repeats
    overwritten: bool = False  # set when a replacement had to land before this file was taken (then unseen)
    dropped_at: float = field(default=0.0, repr=False)

    @property
    def sha256(self) -> str:
        """What the study row's sha256 must be: empty for links (never read), else the bytes' digest."""
        return "" if self.kind == "symlink" else hashlib.sha256(self.data).hexdigest()


class FilmMaker:
    """Makes unique small films from the fixture JPEGs: downscaled, brightness-shifted, noised, re-encoded."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.np_rng = np.random.default_rng(rng.randrange(2**32))
        self.bases = []
        for path in fixture_images():
            with Image.open(path) as img:
                img = img.convert("L")
                img = img.resize((SIDE, max(64, round(img.height * SIDE / img.width))), Image.BILINEAR)
                self.bases.append(np.asarray(img, dtype=np.int16))
        self.seen: set[str] = set()

    def film(self) -> tuple[bytes, str]:
        """Returns (bytes, suffix) of a film no earlier call returned."""
        while True:
            base = self.bases[self.rng.randrange(len(self.bases))]
            pixels = base + self.rng.randint(-6, 6) + self.np_rng.integers(-2, 3, base.shape)
            img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
            buf = io.BytesIO()
            if self.rng.random() < 0.5:
                img.save(buf, "PNG", compress_level=1)
                suffix = ".png"
            else:
                img.save(buf, "JPEG", quality=90)
                suffix = ".jpeg"
            data = buf.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            if digest not in self.seen:
                self.seen.add(digest)
                return data, suffix


def _count(n: int, share: float) -> int:
    return max(1, round(n * share))


def make_plan(n: int, *, seed: int, poison_marker: str) -> list[Entry]:
    """Returns N entries in drop order: 10% corrupt or truncated, 5% empty, 5% slow, 5% duplicates, 5% same-name
    replacements, a few links, one poison film (its name carries `poison_marker`), good films for the rest."""
    rng = random.Random(seed)
    maker = FilmMaker(rng)
    corrupt, empty, slow = _count(n, 0.10), _count(n, 0.05), _count(n, 0.05)
    dups, repl, links = _count(n, 0.05), _count(n, 0.05), len(LINK_TARGETS)
    films = n - corrupt - empty - slow - dups - repl - links - 1
    if films < max(dups, repl):
        raise ValueError(f"n={n} is too small for the storm's mix (at least 20 files)")
    numbers = iter(rng.sample(range(10 * n), n))  # file names say nothing about what a file is
    name = lambda suffix: f"storm_{next(numbers):05d}{suffix}"  # noqa: E731

    def film_entry(kind: str) -> Entry:
        data, suffix = maker.film()
        return Entry(name(suffix), kind, data)

    good = [film_entry("film") for _ in range(films)]
    entries = list(good) + [film_entry("slow") for _ in range(slow)]
    for _ in range(corrupt):
        data, suffix = maker.film()
        if rng.random() < 0.5:  # truncated: a film cut short
            data = data[: rng.randint(len(data) // 5, len(data) * 4 // 5)]
        else:  # garbage, sometimes behind a real PNG/JPEG signature
            data = rng.choice([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0"]) + rng.randbytes(rng.randint(64, 4096))
        entries.append(Entry(name(suffix), "corrupt", data))
    entries += [Entry(name(rng.choice([".png", ".jpeg"])), "empty") for _ in range(empty)]
    entries += [Entry(f"storm_link_{i}.png", "symlink", link_target=t) for i, t in enumerate(LINK_TARGETS)]
    for original in rng.sample(good, dups):
        entries.append(Entry(name(Path(original.name).suffix), "duplicate", original.data, copy_of=original.name))
    data, suffix = maker.film()
    entries.append(Entry(f"storm_{next(numbers):05d}_{poison_marker}{suffix}", "poison", data))
    rng.shuffle(entries)
    # Replacements go last in the plan: each lands on a good film's name once that film has been taken.
    for target in rng.sample(good, repl):
        entries.append(Entry(target.name, "replacement", maker.film()[0], replaces=target.name))
    return entries


class Dropper:
    """Drops a plan into an inbox: plain files written at once, slow files in chunks with pauses longer than
    stable_seconds (the writer keeps the file open), links, and replacements renamed onto a taken name."""

    def __init__(self, inbox: Path, entries: list[Entry], *, pause_seconds: float, claim_wait_seconds: float = 30.0):
        self.inbox, self.entries = inbox, entries
        self.pause, self.claim_wait = pause_seconds, claim_wait_seconds
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def drop_all(self, on_progress: Callable[[float], None] = lambda _: None) -> None:
        """Drops every entry in plan order (slow ones and replacements in background threads); `on_progress`
        gets the fraction dropped after each one, so chaos can be timed against the drop."""
        by_name = {e.name: e for e in self.entries if e.kind != "replacement"}
        for i, entry in enumerate(self.entries, 1):
            path = self.inbox / entry.name
            if entry.kind == "slow":
                self._background(self._write_slowly, entry, path)
            elif entry.kind == "replacement":
                self._background(self._replace, entry, path, by_name[entry.replaces])
            else:
                entry.dropped_at = time.time()
                if entry.kind == "symlink":
                    os.symlink(entry.link_target, path)
                else:
                    with open(path, "xb") as f:
                        f.write(entry.data)
            on_progress(i / len(self.entries))

    def busy(self) -> bool:
        """True while slow writers or replacements are still running."""
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _background(self, target, *args) -> None:
        def run():
            try:
                target(*args)
            except Exception as exc:  # the audit reports it; a dropper bug must not pass as a lost file
                self.errors.append(f"{args[0].name}: {type(exc).__name__}: {exc}")
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def _write_slowly(self, entry: Entry, path: Path) -> None:
        cuts = sorted({len(entry.data) // 3, 2 * len(entry.data) // 3})
        entry.dropped_at = time.time()
        with open(path, "xb", buffering=0) as f:
            start = 0
            for cut in [*cuts, len(entry.data)]:
                f.write(entry.data[start:cut])
                start = cut
                if cut < len(entry.data):
                    time.sleep(self.pause)  # longer than stable_seconds: the ingester may take it half-written

    def _replace(self, entry: Entry, path: Path, original: Entry) -> None:
        # Written under a dot name (ignored by the ingester), then renamed onto the name in one step.
        tmp = self.inbox / f".storm-{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(entry.data)
        first = _inode(path)
        deadline = time.monotonic() + self.claim_wait
        while first is None and time.monotonic() < deadline:  # the original is not written yet
            time.sleep(0.01)
            first = _inode(path)
        while _inode(path) == first and time.monotonic() < deadline:
            time.sleep(0.005)  # the original is still in the inbox: not taken yet
        if first is not None and _inode(path) == first:
            original.overwritten = True  # the sender replaced it before anyone could take it: never seen
        entry.dropped_at = time.time()
        os.replace(tmp, path)


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None
