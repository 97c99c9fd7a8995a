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
import json
import shutil
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

APP_DIR = Path(__file__).resolve().parent.parent
"""The Flower App (pyproject.toml with [tool.flwr.app]) is the repository root (source checkout, editable)."""
DISTRIBUTION = "fedseg"
APP_PACKAGES = ("common", "server", "client")
"""What the ServerApp and the ClientApp import; simulations/ never runs in a deployment."""
PYPROJECT = "pyproject.toml"
CACHE_DIRS = "__pycache__"


def app_dir(configured: str | Path = "") -> Path:
    """The release folder to bundle: ``configured`` (``server.app_dir``), else this installation's sources.

    A source checkout or an editable install bundles the repository root. A
    plain ``pip install .`` (the containers) leaves only the packages in
    site-packages, without pyproject.toml; pip records the folder it
    installed from (PEP 610, ``direct_url.json``), and that folder is used.
    """
    if configured:
        return Path(configured)
    if (APP_DIR / PYPROJECT).is_file():
        return APP_DIR
    try:
        origin = json.loads(metadata.distribution(DISTRIBUTION).read_text("direct_url.json") or "{}").get("url", "")
    except metadata.PackageNotFoundError:
        origin = ""
    source = Path(unquote(urlparse(origin).path)) if origin.startswith("file://") else None
    if source is None or not (source / PYPROJECT).is_file():
        from .cli import UserError

        raise UserError(
            f"{APP_DIR} holds no {PYPROJECT} and the folder fedseg was installed from is not known: "
            f"set server.app_dir (fedseg-client approve: --app) to the reviewed release."
        )
    return source


def app_files(source: Path = APP_DIR) -> dict[str, Path]:
    """Relative path -> file of everything that goes into the bundle."""
    source = Path(source)
    files = {PYPROJECT: source / PYPROJECT}
    for package in APP_PACKAGES:
        for path in sorted((source / package).rglob("*.py")):
            if CACHE_DIRS not in path.parts:
                files[path.relative_to(source).as_posix()] = path
    return files


def write_app(dest: Path, source: Path = APP_DIR) -> Path:
    """``dest`` made a folder of exactly the bundle's files, for ``flwr run`` (which packs a folder, not a list).

    A simulation submits this folder, so it runs the bytes a deployment approves; given the checkout, Flower
    would walk all of it (its virtual environment included: about 5 s of CPU per run) and pack tests and docs.
    """
    shutil.rmtree(dest, ignore_errors=True)
    for rel, path in app_files(source).items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / rel)
    return dest


def bundle_bytes(source: Path = APP_DIR) -> bytes:
    """The FAB, built by Flower's own bundler from :func:`app_files`."""
    from .flower.fab import build_fab_from_files

    return build_fab_from_files(app_files(source))[0]


def bundle_sha256(source: Path = APP_DIR) -> str:
    return hashlib.sha256(bundle_bytes(source)).hexdigest()
