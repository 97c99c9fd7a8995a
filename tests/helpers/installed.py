"""fedseg installed as the containers install it: a copy of the release, ``pip install .`` (not editable).

torch and the other dependencies come from the test environment (a .pth file), so nothing large is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

SHIPPED = ("pyproject.toml", "README.md", "common", "server", "client", "simulations")
"""What deploy/Dockerfile.* copy into /opt/fedseg before ``pip install .``."""


def fresh_install(root: Path) -> tuple[Path, Path]:
    """A new venv under ``root`` with fedseg installed from a copy of the release exactly as the Dockerfiles do:
    (its bin folder, the release folder)."""
    repo = Path(__file__).resolve().parents[2]
    release = root / "opt-fedseg"
    release.mkdir()
    for name in SHIPPED:
        if (repo / name).is_dir():
            shutil.copytree(repo / name, release / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(repo / name, release / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q"]
    subprocess.run([*pip, "."], cwd=release, env=env, check=True, timeout=600)
    # Flower's executables, for the fresh interpreter (the package itself is the shared one's version).
    subprocess.run([*pip, "--ignore-installed", f"flwr=={metadata.version('flwr')}"], env=env, check=True, timeout=600)
    return venv / "bin", release
