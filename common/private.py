"""Folders and files that hold patient data or federation secrets: owner-only, whatever the umask.

A site's state directory holds preprocessed scans (``cache/*.npy``), its
norm tensors and logs; the centre's holds the SuperLink database. Created
under a default umask they would be readable by every local user.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path | str) -> Path:
    """Create ``path`` (and parents) if needed and make it owner-only (0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def private_file(path: Path | str) -> Path:
    """Create ``path`` if needed (empty) and make it owner-only (0600), before anything is written into it."""
    path = Path(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    os.chmod(path, FILE_MODE)
    return path
