"""Environment for every Flower process fedseg starts: private, quiet, offline.

A hospital product does not phone home: Flower's telemetry and Ray's usage
stats are off, the SuperLink never runs ``uv sync`` for an app, and thread
pools are sized for the cores we were given rather than the whole machine.
A site's SuperExec looks for new ClientApp tasks every 0.1 s, not every
second (``SITE_ENV``: a local call, and the delay is paid by every message of
every round); the centre's and a simulation's keep Flower's second, as each
launches one app per run and every look is a database query at the SuperLink.
A message's arrays travel as up to 8 objects at a time rather than 2
(each is one HTTP request, and a tiny model's message is over 40 of them).
These are Flower's own settings, given as environment variables; what needs
a patch of Flower is in common/flower/ (for example the pull back-off,
common/flower/object_pulls.py).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

BIN_DIR = Path(sys.executable).parent
"""Flower's executables live next to this interpreter, activated or not."""

PRIVATE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_DEDUP_LOGS": "0",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "8",
    "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "8",
}

SITE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
"""Added for a site's SuperNode: its SuperExec starts each message's ClientApp within 0.1 s."""


def flower_env(flwr_home: Path, threads: int = 1) -> dict[str, str]:
    """os.environ plus fedseg's settings, with FLWR_HOME pointing at a folder of our own."""
    env = dict(os.environ)
    env.update(PRIVATE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def flower_command(name: str) -> str:
    """Absolute path of a Flower executable (flwr, flower-superlink, flower-supernode)."""
    return str(BIN_DIR / name)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
