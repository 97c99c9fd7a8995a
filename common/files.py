"""Writing files so that a crash never leaves half of one, and reading JSON Lines written that way.

Every state, checkpoint and log file of fedseg goes through these helpers: a
write lands in a temporary file next to the target, is fsynced, then renamed
over it (atomic on POSIX), so readers see the old file or the new one. JSON
Lines logs are appended line by line; a reader skips a last line that is
still being written.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, make it durable, then rename it over ``path``.

    The temporary name is unique to this write, so two writers of one file (a
    site answering two runs at once both keep its plan and site.json) never
    write into, or rename away, each other's temporary file: the last rename wins.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_save(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_copy(source: Path, path: Path) -> None:
    atomic_save(path, lambda tmp: tmp.write_bytes(Path(source).read_bytes()))


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
