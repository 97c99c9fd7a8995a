"""Where a run's files live (docs/architecture.md, "Run directory"), in one place."""

from __future__ import annotations

import time
from pathlib import Path

from .config import FederationConfig, FedsegConfig

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
REPORT_DIR = "report"
SIM_SITES_DIR = "sites"
SERVER_CONFIG_ENV = "FEDSEG_SERVER_CONFIG"
"""Deployment: path of the centre's full resolved config, for the ServerApp (sites get ``site_view`` only)."""
SERVER_CONFIG_FILE = "server-config.yaml"


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


def site_view(cfg: FedsegConfig) -> FedsegConfig:
    """The part of the centre's config that sites need: model, data and training settings, the wire dtype.

    Flower hands the run config to every site, so in a deployment it holds
    only this: no centre path (runs, certificates, state), no other site's
    name, no server or privacy setting. Everything else keeps its default.
    """
    return FedsegConfig(model=cfg.model, data=cfg.data, train=cfg.train,
                        federation=FederationConfig(wire_dtype=cfg.federation.wire_dtype))
