"""Writing files so that a crash never leaves half of one, and reading JSON Lines written that way.

Every state, checkpoint, plan and log file of fedseg goes through ``atomic_save``:
a write lands in a temporary file next to the target (created owner-only when
the caller asks, so a secret is never readable, not even for a moment), is
fsynced, renamed over the target (atomic on POSIX), and the folder is fsynced
so the rename itself survives a power cut. Readers see the old file or the
new one. JSON Lines logs are appended line by line; a reader skips a last line
that is still being written.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .private import FILE_MODE


def _temporary(path: Path) -> Path:
    """A name beside ``path`` unique to this writer (process and thread)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(path: Path, write: Callable[[Path], object], private: bool = False) -> None:
    """Let ``write`` fill a temporary file beside ``path``, make it durable, then rename it over ``path``.

    The temporary name is unique to this write, so two writers of one file (a
    site answering two runs at once both keep its plan and site.json) never
    write into, or rename away, each other's temporary file: the last rename wins.
    ``private``: the file is owner-only (0600) from its first byte, whatever the umask.
    A failed write leaves the old file as it was and no temporary file behind.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        if private:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE))
            os.chmod(tmp, FILE_MODE)
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, private: bool = False) -> None:
    atomic_save(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), private)


def atomic_write_bytes(path: Path, data: bytes, private: bool = False) -> None:
    atomic_save(path, lambda tmp: tmp.write_bytes(data), private)


def atomic_copy(source: Path, path: Path, private: bool = False) -> None:
    atomic_write_bytes(path, Path(source).read_bytes(), private)


def atomic_folder(folder: Path, fill: Callable[[Path], None], complete: str) -> None:
    """Let ``fill`` write a folder of this writer's own beside ``folder``, make its files durable, rename it into place.

    Two writers may build one folder at once (a site answering two runs builds
    one case twice): the first rename wins, the other's copy is dropped, and a
    reader never sees a half-built folder. ``complete`` names the file every
    finished folder holds: a folder without it (a crash of an older fedseg) is
    replaced. A failed write (a full disk) leaves nothing behind.
    """
    folder = Path(folder)
    building = _temporary(folder)
    shutil.rmtree(building, ignore_errors=True)
    try:
        building.mkdir(parents=True)
        fill(building)
        for file in building.iterdir():
            with file.open("rb") as f:
                os.fsync(f.fileno())
        fsync_dir(building)
        if folder.exists() and not (folder / complete).is_file():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(building, folder)
        except OSError:  # another writer put the same folder in place first
            return
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The complete lines of a JSON Lines file (none if it does not exist); a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return
            if line.strip():
                yield json.loads(line)
