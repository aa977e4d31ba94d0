"""The claim folder: how an inbox file is taken out of the sender's hands before any of it is read.

A file is claimed by one atomic rename into `<inbox>/.claimed/<random>/<its name>`. The claim folder lies
inside the inbox, so the rename never crosses a mount, and the inbox name is free the moment it returns: a
film renamed onto the same name afterwards is a different file and becomes a study of its own. The watcher
and the scan skip dotfolders, so claimed files are seen only through `leftovers` (a crash, or an attempt
that raised), which the next scan or sweep ingests again; no claimed file is ever dropped.

A claimed entry is read only through one descriptor opened with O_NOFOLLOW (a symbolic link is refused,
never followed) and checked with fstat (pipes, sockets and devices are refused), and no more than
`max_file_bytes` + 1 bytes are ever read from it.
"""
from __future__ import annotations

import fcntl
import errno
import hashlib
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

CLAIM_DIR = ".claimed"
REJECT_DIR = ".rejected"  # oversize files: kept, unread, beside the inbox on its own file system
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1 << 20
# Claim folders an ingest of this process is working on; a sweep must not ingest them a second time.
_ACTIVE: set[Path] = set()
_ACTIVE_LOCK = threading.Lock()


class NotRegular(Exception):
    """The claimed entry is not a regular file (symbolic link, pipe, socket, device): it is never read."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class Oversize(Exception):
    """The claimed file is larger than max_file_bytes; `size` is its size (or the bytes seen so far)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"{size} > {limit}")
        self.size, self.limit = size, limit


def claim_root(inbox: Path) -> Path:
    """Returns the inbox's claim folder."""
    return inbox / CLAIM_DIR


def is_claimed(path: Path, *, inbox: Path) -> bool:
    """Tells whether a path is a file inside one of the inbox's claim folders."""
    return path.parent.parent == claim_root(inbox)


def activate(folder: Path) -> bool:
    """Marks a claim folder as being ingested by this process; False if it already is."""
    with _ACTIVE_LOCK:
        if folder in _ACTIVE:
            return False
        _ACTIVE.add(folder)
        return True


def finish(folder: Path) -> None:
    """Ends work on a claim folder: removes it (and the claim root) when empty, and releases it."""
    for d in (folder, folder.parent):
        try:
            d.rmdir()
        except OSError:
            pass  # not empty: a file left for a retry, or other claims in flight
    with _ACTIVE_LOCK:
        _ACTIVE.discard(folder)


def claim(path: Path, *, inbox: Path) -> Path | None:
    """Moves an inbox entry into a fresh claim folder by one atomic rename and marks the folder active;
    returns the claimed path, or None if the entry vanished (deleted by its sender, or taken meanwhile).
    The caller must call `finish(claimed.parent)` when done."""
    for _ in range(5):
        folder = claim_root(inbox) / uuid.uuid4().hex
        activate(folder)  # before the folder exists, so a sweep never takes it for a leftover
        try:
            folder.mkdir(parents=True)
        except FileNotFoundError:
            finish(folder)  # a finishing ingest removed the empty claim root between the two mkdirs
            continue
        except BaseException:
            finish(folder)
            raise
        dest = folder / path.name
        try:
            os.rename(path, dest)  # rename never follows a symbolic link: the link itself is claimed
        except FileNotFoundError:
            finish(folder)
            return None
        except BaseException:
            finish(folder)
            raise
        return dest
    raise OSError(f"could not create a claim folder under {claim_root(inbox)}")


def leftovers(inbox: Path) -> list[Path]:
    """Lists claimed files that no ingest of this process is working on (left by a crash or a failed try)."""
    out = []
    try:
        folders = sorted(claim_root(inbox).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    for folder in folders:
        with _ACTIVE_LOCK:
            if folder in _ACTIVE:
                continue
        try:
            entries = list(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not entries:  # a crash between mkdir and rename left it empty
            try:
                folder.rmdir()
            except OSError:
                pass
        out.extend(entries)
    return out


def _can_open(path: Path) -> bool:
    # Without following links or blocking on a pipe: only a regular file's readability matters here.
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK))
        return True
    except OSError:
        return False


def _written_and_closed(path: Path) -> bool:
    """Tells whether the entry is a regular file that no process holds open for writing (a read lease is
    granted); False when that cannot be told."""
    try:
        fd = open_claimed(path)
    except (NotRegular, OSError):
        return False
    try:
        return _read_lease(fd) is True
    finally:
        os.close(fd)


def wait_until_stable(path: Path, seconds: float, *, stop: threading.Event | None = None,
                      renamed_in: bool | Callable[[], bool] = False) -> bool:
    """Blocks until the inbox entry has not changed for `seconds` (and opens, when a regular file); False if it
    vanished or we are stopping. It looks at the entry itself (lstat), so a link swapped in restarts the wait.

    `renamed_in`: the watcher saw the entry renamed into the inbox. A sender that writes a temporary name and
    renames it when done (core.intake.dicom_listener, rsync, most exporters) says by the rename that the file is
    complete, so a regular file that no process still holds open for writing is taken at once. A rename
    can only come from the inbox's own file system: a copy from elsewhere is created and written in place, and
    waits. A callable is asked at every look, since the watcher's rename event can arrive after the inbox sweep
    has already started this wait for the same entry.
    """
    renamed = renamed_in if callable(renamed_in) else (lambda: renamed_in)
    poll = max(0.02, min(0.25, seconds / 4))
    last, since = None, time.monotonic()
    while True:
        if renamed() and _written_and_closed(path):
            return True
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        sig = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        now = time.monotonic()
        if sig != last:
            last, since = sig, now
        # Every write, rename and attribute change moves the entry's ctime, which no sender can set back: an entry
        # whose mtime and ctime are both `seconds` old has not changed for `seconds`, and is stable at the first
        # look. Those are the files dropped while we were down and, in a burst, those that waited in the ingest
        # threads' queue: with a second look 0.05 s later, four threads took about 62 films/s and held back a
        # CPU that scores faster (README's performance section).
        idle_on_disk = time.time() - max(st.st_mtime, st.st_ctime) >= seconds
        if (now - since >= seconds or idle_on_disk) and (not stat.S_ISREG(st.st_mode) or _can_open(path)):
            return True
        if stop is not None and stop.is_set():
            return False
        time.sleep(poll)


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))
    return next((name for test, name in kinds if test(mode)), "special file")


def open_claimed(path: Path) -> int:
    """Opens a claimed regular file for reading without following links; raises NotRegular otherwise.

    O_NONBLOCK keeps a named pipe from blocking the open; it changes nothing for a regular file.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP, errno.ENODEV):
            raise NotRegular(_kind(os.lstat(path).st_mode)) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegular(_kind(mode))
    return fd


def signature(fd: int) -> tuple[int, int, int]:
    """Size, mtime and ctime of an open file: any write by a sender still holding it open changes them."""
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def wait_stable(fd: int, seconds: float, *, stop: threading.Event | None = None) -> bool:
    """Blocks until the open file has not changed for `seconds`; False if we are stopping."""
    poll = max(0.02, min(0.25, seconds / 4))
    last, since = signature(fd), time.monotonic()
    while True:
        if stop is not None and stop.is_set():
            return False
        time.sleep(poll)
        sig, now = signature(fd), time.monotonic()
        if sig != last:
            last, since = sig, now
        elif now - since >= seconds:
            return True


def copy_and_hash(fd: int, dest: Path, *, limit: int) -> tuple[str, int]:
    """Copies the open file from its start into `dest` (a new file, flushed to disk) and returns (sha256, size);
    raises Oversize as soon as more than `limit` bytes have been read."""
    os.lseek(fd, 0, os.SEEK_SET)
    h, size = hashlib.sha256(), 0
    with open(dest, "xb") as out:
        while chunk := os.read(fd, min(_CHUNK, limit + 1 - size)):
            size += len(chunk)
            if size > limit:
                raise Oversize(max(size, os.fstat(fd).st_size), limit)
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size


def file_sha256(path: Path) -> str:
    """Returns the sha256 of a file we wrote ourselves (the archive copy, to verify it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def reject(claimed: Path, *, inbox: Path) -> Path:
    """Moves a claimed file, unread, to `<inbox>/.rejected/<its claim folder>/` (same file system, one
    rename); returns its new path."""
    root = inbox / REJECT_DIR
    root.mkdir(exist_ok=True)
    folder = root / claimed.parent.name
    os.rename(claimed.parent, folder)
    return folder / claimed.name


def remove_claimed(claimed: Path, fd: int | None = None) -> None:
    """Deletes a claimed entry (a link itself, never its target); with `fd`, only if it is still that file."""
    if fd is not None:
        st, now = os.fstat(fd), os.lstat(claimed)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise OSError(f"claimed file {claimed} was replaced; not removed")
    claimed.unlink(missing_ok=True)


def writer_open(fd: int) -> bool:
    """Tells whether any process still has the file open for writing (Linux: a read lease is refused then).

    A sender that pauses longer than the stability wait looks finished by size and time alone; removing the
    claimed file then would leave its remaining writes in an unlinked inode. False where leases are not
    supported (another OS or file system): the stability wait is all there is.
    """
    return _read_lease(fd) is False


def _read_lease(fd: int) -> bool | None:
    """Tries a read lease on an open file and gives it back: True when granted (no process has the file open
    for writing), False when refused for a writer, None when leases cannot tell (another OS or file system,
    or a file owned by another user without CAP_LEASE)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return False if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    except AttributeError:  # no F_SETLEASE on this platform
        return None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def wait_writers_closed(fd: int, seconds: float, *, stop: threading.Event | None = None) -> None:
    """Waits (at most `seconds`) until no process has the claimed file open for writing."""
    deadline = time.monotonic() + seconds
    while writer_open(fd) and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        time.sleep(0.05)
