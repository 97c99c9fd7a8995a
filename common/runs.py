"""Where a run's files live (docs/architecture.md, "Run directory"), in one place."""

from __future__ import annotations

import time
from pathlib import Path

from .config import FedsegConfig

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
REPORT_DIR = "report"
SIM_SITES_DIR = "sites"


def new_run_name(prefix: str = "run") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir(cfg: FedsegConfig) -> Path:
    """The run directory named by the config; run_name must already be set."""
    if not cfg.federation.run_name:
        raise ValueError("federation.run_name is empty: the launcher must name the run before it starts.")
    return Path(cfg.federation.runs_dir) / cfg.federation.run_name


def simulated_site_config(run: Path, partition_id: int) -> Path:
    """site.yaml of the simulated site that Flower's simulation engine calls partition ``partition_id``."""
    return Path(run) / SIM_SITES_DIR / f"site-{partition_id + 1}.yaml"
