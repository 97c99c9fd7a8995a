"""The ServerApp: one federated training run, from initial weights to best checkpoint.

The same app runs in a deployment (submitted by ``fedseg-server start``) and in
the local simulation (``fedseg-sim``); the resolved configuration travels in
the run config, so both apps and the run directory agree on every setting.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import keys
from common.config import FedsegConfig, from_yaml_text
from common.metrics_log import MetricsLog
from common.model import build_model
from common.params import model_signature, select, split_parameters
from common.runs import CHECKPOINT_DIR, CONFIG_FILE, run_dir

from .checkpoints import Checkpoints
from .strategy import FedSegStrategy, QuorumNotReached

log = logging.getLogger("fedseg.server")

app = ServerApp()


def initial_weights(cfg: FedsegConfig) -> tuple[dict[str, torch.Tensor], str]:
    """Seeded initial travelling tensors and the model signature every site must match."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    split = split_parameters(model, cfg.train.norm_mode)
    return select(model, split.travelling), model_signature(model, split)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_yaml_text(str(context.run_config[keys.RUN_CONFIG_KEY]), "run config")
    run = run_dir(cfg)
    run.mkdir(parents=True, exist_ok=True)
    (run / CONFIG_FILE).write_text(cfg.to_yaml())
    weights, signature = initial_weights(cfg)
    checkpoints = Checkpoints(run / CHECKPOINT_DIR)
    resumed = checkpoints.load_last()
    done = checkpoints.state.last_round if resumed is not None else 0
    metrics_log = MetricsLog(run)
    metrics_log.write("run-start", run=cfg.federation.run_name, config_sha256=cfg.sha256(),
                      sites=cfg.federation.sites, signature=signature, resumed_from_round=done)
    metrics_log.sync()
    strategy = FedSegStrategy(
        cfg, signature, {k: tuple(v.shape) for k, v in weights.items()}, metrics_log, checkpoints,
        round_offset=done,
    )
    status = "completed"
    try:
        if cfg.federation.rounds > done:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(resumed if resumed is not None else weights),
                num_rounds=cfg.federation.rounds - done,
                timeout=cfg.federation.round_timeout_s,
                train_config=ConfigRecord(),
                evaluate_config=ConfigRecord(),
            )
    except QuorumNotReached as err:
        status = f"stopped: {err}"
        raise
    except Exception as err:
        status = f"failed: {type(err).__name__}"
        raise
    finally:
        state = checkpoints.state
        metrics_log.write("run-end", status=status, rounds_completed=state.last_round,
                          best_round=state.best_round, best_dice=state.best_dice)
        metrics_log.close()
