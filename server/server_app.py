"""The ServerApp: one federated training run, from initial weights to best checkpoint.

The same app runs in a deployment (submitted by ``fedseg-server start``) and in
the local simulation (``fedseg-sim``); the resolved configuration travels in
the run config, so both apps and the run directory agree on every setting.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import keys, threadsafe_monai  # noqa: F401  (threadsafe_monai: MONAI whole before any thread races for it)
from common.config import FedsegConfig, from_yaml_text, load_config, view_from_yaml, with_channels
from common.flower.object_pulls import quicken_object_pulls
from common.metrics_log import Event, read_events
from common.params import run_model, select
from common.plan import Plan
from common.runs import CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, PLAN_FILE, SERVER_CONFIG_ENV, run_dir, site_view

from . import cross_eval
from .checkpoints import Checkpoints, log_run_end
from .inbound import Inbox
from .packed_grid import PackedGrid
from .planning import PlanningFailed, plan_config, plan_federation
from .pretrained import start_weights
from .receiving_grid import ReceivingGrid
from .resume import resume_point
from .round_mean import QuorumNotReached
from .site_registry import read_nodes
from .strategy import FedSegStrategy
from .tensorboard import open_log

log = logging.getLogger("fedseg.server")

app = ServerApp()


def initial_weights(cfg: FedsegConfig) -> tuple[dict[str, torch.Tensor], str]:
    """Seeded initial travelling tensors and the model signature every site must match."""
    model, split, signature = run_model(cfg)
    return select(model, split.travelling), signature


def server_config(context: Context) -> FedsegConfig:
    """The centre's full config: from its own file in a deployment (the run config that every site
    receives holds only ``site_view``, and must match it), else from the run config (simulation)."""
    submitted = str(context.run_config[keys.RUN_CONFIG_KEY])
    path = os.environ.get(SERVER_CONFIG_ENV)
    if not path:
        return from_yaml_text(submitted, "run config")
    cfg = load_config(Path(path))
    if site_view(cfg) != view_from_yaml(submitted, "run config"):
        raise ValueError(
            f"{path} does not match the submitted run's configuration; start the run with "
            f"fedseg-server start, which writes both."
        )
    return cfg


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = server_config(context)
    quicken_object_pulls()
    grid = PackedGrid(grid)
    run = run_dir(cfg)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.federation.evaluate_checkpoint:
        cfg = with_planned_model(cfg, Plan.load(run / PLAN_FILE))
        cross_eval.on_demand(grid, cfg, initial_weights(cfg)[1], run)
        return
    checkpoints = Checkpoints(run / CHECKPOINT_DIR)
    resume = resume_point(run, checkpoints)
    done = resume.done
    metrics_log = open_log(run, cfg.federation.tensorboard)  # mirrored live to TensorBoard when asked
    metrics_log.write(
        Event.RUN_START,
        run=cfg.federation.run_name,
        run_id=cfg.federation.run_id,
        config_sha256=cfg.sha256(),
        sites=cfg.federation.sites,
        resumed_from_round=done,
    )
    metrics_log.sync()
    node_sites = read_nodes(run)  # one map of node -> site for the boundary, planning and the strategy
    inbox = Inbox(node_sites, run)
    grid = ReceivingGrid(grid, metrics_log, cfg.federation.poll_interval_s, inbox)
    status = "completed"
    try:
        training = cross_eval.training_grid(grid, cfg, node_sites)
        plan = plan_federation(training, cfg, run, metrics_log, node_sites)
        cfg = with_planned_model(cfg, plan)
        (run / CONFIG_FILE).write_text(cfg.to_yaml())  # what export and predict at a site build the model from
        # the start model: the seeded init, or model.init_weights over it (a resumed run continues its own)
        weights, signature = start_weights(cfg, metrics_log) if resume.weights is None else initial_weights(cfg)
        strategy = FedSegStrategy(
            cfg,
            signature,
            {k: tuple(v.shape) for k, v in weights.items()},
            metrics_log,
            checkpoints,
            round_offset=done,
        )
        strategy.release.resume(resume.model_round)
        strategy.node_sites = strategy.screen.node_sites = node_sites  # the boundary's map, shared
        if cfg.federation.rounds > done:
            strategy.start(
                grid=training,
                initial_arrays=ArrayRecord(resume.weights if resume.weights is not None else weights),
                num_rounds=cfg.federation.rounds - done,
                timeout=cfg.federation.round_timeout_s,
                train_config=plan_config(plan),
                evaluate_config=plan_config(plan),
            )
        if checkpoints.state.last_round == 0:
            raise NothingTrained(f"no site trained; {first_failure(run)}")
        cross_eval.after_training(grid, cfg, signature, metrics_log, run, node_sites)
    except QuorumNotReached as err:
        status = f"stopped: {err}"
        raise
    except (NothingTrained, PlanningFailed) as err:
        status = f"failed: {err}"
        raise
    except Exception as err:
        status = f"failed: {type(err).__name__}"
        raise
    finally:
        log_run_end(metrics_log, status, checkpoints.state)


class NothingTrained(RuntimeError):
    """No round of the run was aggregated: every site failed or was refused; the message gives the first reason."""


def first_failure(run: Path) -> str:
    """The first failure the run's metrics log holds, for the console."""
    failures = list(read_events(run / METRICS_FILE, Event.FAILURE))
    if not failures:
        return "no failure was logged"
    first = failures[0]
    return f"first failure: site {first.get('site')} ({first.get('stage')}): {first.get('reason')}"


def with_planned_model(cfg: FedsegConfig, plan: Plan) -> FedsegConfig:
    """The run's config with the model's channels and classes the federation agreed on at planning."""
    if not plan.label_codes:  # a plan written before labels were agreed: the config must name them
        return cfg
    return cfg.replace(
        model=with_channels(cfg.model, len(plan.normalization), len(plan.label_codes), "the sites' dataset.json")
    )
