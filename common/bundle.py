"""The Flower app bundle (FAB) fedseg ships to sites, and its identity.

The bundle holds exactly the code a run executes: pyproject.toml and the
Python files of common/, server/ and client/, nothing else (no tests, docs or
data, so editing a README does not change what sites must approve). Flower
packs a FAB with fixed timestamps and sorted entries, so the same sources
always give the same bytes: a site computes the SHA-256 of the bundle it
approves from its own reviewed copy of a release (``fedseg-client approve``),
and ``fedseg-server start`` submits exactly these bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
"""The Flower App (pyproject.toml with [tool.flwr.app]) is the repository root."""
APP_PACKAGES = ("common", "server", "client")
"""What the ServerApp and the ClientApp import; simulations/ never runs in a deployment."""
PYPROJECT = "pyproject.toml"
CACHE_DIRS = "__pycache__"


def app_files(source: Path = APP_DIR) -> dict[str, Path]:
    """Relative path -> file of everything that goes into the bundle."""
    source = Path(source)
    files = {PYPROJECT: source / PYPROJECT}
    for package in APP_PACKAGES:
        for path in sorted((source / package).rglob("*.py")):
            if CACHE_DIRS not in path.parts:
                files[path.relative_to(source).as_posix()] = path
    return files


def bundle_bytes(source: Path = APP_DIR) -> bytes:
    """The FAB, built by Flower's own bundler from :func:`app_files`."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(source))[0]


def bundle_sha256(source: Path = APP_DIR) -> str:
    return hashlib.sha256(bundle_bytes(source)).hexdigest()

