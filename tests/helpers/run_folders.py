"""Run folders as the centre hands them to hospitals, and a site that trained in one: what ``fedseg-client
predict``, ``export`` and ``audit`` and a pretrained start read, built without running a federation."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors.torch import save_file

from client.site_state import SiteState
from common.config import load_config
from common.params import run_model, select
from common.plan import ChannelNorm, Plan
from common.runs import METRICS_FILE
from server.server_app import initial_weights
from tests.helpers.nifti_cases import LPS, RAS, nnunet_dataset, phantom, save
from tests.helpers.tiny import tiny

TINY = tiny("train.adapt_norm_steps=2")
"""The run's settings: the tiny model, with a norm adaptation short enough for a test."""
TRAINED_ROUND = 2
"""The round whose model the trained site scored and kept (``trained_site``)."""


def run_plan(spacing=(1.0, 1.2, 2.0), in_channels: int = 1) -> Plan:
    """The run's plan: ``spacing``, a 16-voxel patch, z-scored channels."""
    return Plan(tuple(spacing), (16, 16, 16), (ChannelNorm("zscore"),) * in_channels, (24, 20, 16))


def run_folder(
    tmp_path: Path, checkpoints: tuple[str, ...] = ("best",), in_channels: int = 1, name: str = "run"
) -> Path:
    """A run folder as the centre hands it to hospitals: config.yaml, plan.json and global checkpoints."""
    cfg = load_config(None, [*TINY, f"model.in_channels={in_channels}"])
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    run_plan(in_channels=in_channels).save(run / "plan.json")
    weights, _ = initial_weights(cfg)
    for checkpoint in checkpoints:
        save_file(weights, str(run / "checkpoints" / f"{checkpoint}.safetensors"))
    return run


def site_yaml(tmp_path: Path, **settings: object) -> Path:
    """A hospital's site.yaml (site ``h``, its state under ``tmp_path``), with ``settings`` added."""
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"site": {"name": "h", "state_dir": str(tmp_path / "state"), **settings}}))
    return path


def trained_site(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run folder, a site that trained in it (its own norm tensors of TRAINED_ROUND) and a folder of scans
    (``ras_0000.nii.gz``, ``lps_0000.nii.gz``): (run, site.yaml, scans)."""
    cfg = load_config(None, TINY)
    run = run_folder(tmp_path, ("best", "last", f"round-{TRAINED_ROUND:04d}"))
    (run / "checkpoints" / "state.json").write_text(
        json.dumps({"last_round": TRAINED_ROUND, "best_round": TRAINED_ROUND, "best_dice": 0.5})
    )
    (run / METRICS_FILE).write_text(
        "\n".join(
            json.dumps(e)
            for e in [
                {"event": "evaluate", "round": TRAINED_ROUND, "site": "h", "dice": 0.6125},
                {"event": "round", "round": TRAINED_ROUND, "dice_mean": 0.55},
            ]
        )
        + "\n"
    )
    model, split, signature = run_model(cfg)
    local = {k: v * 1.5 + 0.1 for k, v in select(model, split.local).items()}  # differs from the global init
    SiteState(tmp_path / "state").run_named("run", "").save_norm(TRAINED_ROUND, local, signature)  # named by folder
    site = site_yaml(tmp_path, data_dir=str(nnunet_dataset(tmp_path / "data")))
    scans = tmp_path / "scans"
    for name, affine in (("ras", RAS), ("lps", LPS)):
        save(phantom(seed=3)[0], affine, scans / f"{name}_0000.nii.gz")
    return run, site, scans
