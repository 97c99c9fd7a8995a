"""Cross-site evaluation: every global checkpoint scored at every site, as a Flower query round.

Site-local normalization tensors never leave their site, so one site's model
cannot be scored on another site's data. The matrix is therefore
checkpoints x sites: each site scores the global shared weights with its own
norm tensors on its own validation cases, and on its labelled test cases when
it has any (the test Dice is reported, never used to choose anything). Sites
listed in ``federation.held_out_sites`` connect but never train; they score
each checkpoint on all their labelled cases as it arrives and after adapting
their normalization layers to those scans, so the report can put both numbers
side by side.

The matrix is written to ``<run>/cross-eval.json`` and, one event per cell,
into the metrics log. Every cell, every failure and the choice of which nodes
are held out name the site registered for the node (server/site_registry.py),
never a name a reply claims: a site cannot file scores under another
hospital's name, and a held-out hospital cannot join training by claiming a
training site's name.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import load_file

from common import keys
from common.config import FedsegConfig
from common.files import atomic_write_text
from common.flower.constants import SUPERLINK_NODE_ID
from common.flower.grid import DelegatingGrid
from common.metrics_log import Event, MetricsLog
from common.runs import (
    BEST,
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    CHECKPOINT_NAMES,
    CROSS_EVAL_FILE,
    LAST,
    LAST_CHECKPOINT,
    PLAN_FILE,
    parse_checkpoint_name,
    run_dir,
)
from common.wire import named_site, to_wire

from .checkpoints import Checkpoints, log_run_end
from .nodes import wait_for_nodes
from .site_registry import claim_problem, read_nodes, site_name

log = logging.getLogger("fedseg.server")

MESSAGE_TYPE = f"{MessageType.QUERY}.{keys.CROSS_EVAL_ACTION}"


@dataclass(frozen=True)
class Cell:
    """One site's score of one checkpoint."""

    model: str
    site: str
    trained: bool
    dice: float
    """Dice with the site's own norm tensors on its validation cases (a held-out site: on all its labelled
    cases, with the checkpoint as it arrives)."""
    dice_adapted: float | None
    """Held-out sites only: Dice after norm adaptation on the site's unlabeled scans."""
    num_examples: int
    dice_personal: float | None = None
    """Trained sites with ``train.personalize_steps``: Dice of the site's personalized copy."""
    dice_per_class: list[float] = field(default_factory=list)
    test_dice: float | None = None
    """Training sites with labelled test cases: Dice on them (reported only, never used to choose)."""
    test_dice_per_class: list[float] | None = None
    test_dice_personal: float | None = None
    """Test Dice of the personalized copy (with ``train.personalize_steps``)."""
    test_num_examples: int = 0


class TrainingGrid(DelegatingGrid):
    """The run's Grid minus the held-out nodes, so the strategy never asks them to train."""

    def __init__(self, grid: Grid, hidden: set[int]) -> None:
        super().__init__(grid)
        self._hidden = hidden

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._grid.get_node_ids() if n not in self._hidden]

    def get_nodes(self):
        return [n for n in self._grid.get_nodes() if n.node_id not in self._hidden]


def _query(node: int, task: str, config: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({keys.CONFIG: ConfigRecord({keys.CROSS_EVAL_TASK: task, **config})})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content=content, dst_node_id=node, message_type=MESSAGE_TYPE)


def training_grid(grid: Grid, cfg: FedsegConfig, nodes: dict[int, str] | None = None) -> Grid:
    """Hide the held-out sites' nodes from training; the grid itself when there are none.

    ``nodes`` are the registered node -> site names (by default those of the run folder): a node registered
    as a held-out site is hidden whatever its reply says. A node nobody registered (the simulation) is asked
    who it is, and is bound to that name from then on (server/site_registry.py ``site_name``).
    """
    held_out = set(cfg.federation.held_out_sites)
    if not held_out:
        return grid
    nodes = read_nodes(run_dir(cfg)) if nodes is None else nodes
    expected = len(cfg.federation.sites) + len(held_out)
    ids = wait_for_nodes(grid, expected, cfg.federation.round_timeout_s)
    replies = grid.send_and_receive([_query(n, "identify", {}) for n in ids], timeout=cfg.federation.round_timeout_s)
    for m in replies:
        if not m.has_error() and claim_problem(nodes, m.metadata.src_node_id, named_site(m)) is None:
            site_name(nodes, m.metadata.src_node_id, named_site(m))
    hidden = {n for n in ids if nodes.get(n) in held_out}
    if missing := held_out - {nodes.get(n) for n in ids}:
        log.warning("held-out site(s) %s did not answer; they will not be cross-evaluated", sorted(missing))
    return TrainingGrid(grid, hidden)


def _cell(model: str, msg: Message, site: str, nodes: dict[int, str]) -> Cell | str:
    """The reply as site ``site``'s cell, or the reason it cannot be used."""
    if msg.has_error():
        return msg.error.reason or f"error code {msg.error.code}"
    if problem := claim_problem(nodes, msg.metadata.src_node_id, named_site(msg)):
        return problem
    metrics = msg.content.metric_records.get(keys.METRICS)
    if metrics is None or "dice" not in metrics:
        return "reply lacks the Dice metric"
    try:
        return _parsed_cell(model, site, metrics)
    except Exception as err:  # noqa: BLE001 - a hostile or broken site: its cell is left out, the matrix stands
        return f"malformed cross-eval metrics ({type(err).__name__})"


def _parsed_cell(model: str, site: str, metrics) -> Cell:
    return Cell(
        model=model,
        site=site,
        trained=bool(metrics.get("trained", 0.0)),
        dice=_dice(metrics["dice"]),
        dice_adapted=_optional(metrics, "dice_adapted"),
        num_examples=int(metrics.get(keys.NUM_EXAMPLES, 0)),
        dice_personal=_optional(metrics, "dice_personal"),
        dice_per_class=_per_class(metrics, keys.DICE_CLASS_PREFIX),
        test_dice=_optional(metrics, keys.TEST_DICE),
        test_dice_per_class=_per_class(metrics, keys.TEST_DICE_CLASS_PREFIX) if keys.TEST_DICE in metrics else None,
        test_dice_personal=_optional(metrics, keys.TEST_DICE_PERSONAL),
        test_num_examples=int(metrics.get(keys.TEST_NUM_EXAMPLES, 0)),
    )


def _dice(value: object) -> float:
    """A Dice value as a site may send it: one finite number in [0, 1], or ValueError/TypeError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a Dice value must be a number, got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:  # also refuses NaN
        raise ValueError(f"a Dice value must lie in [0, 1], got {value!r}")
    return float(value)


def _optional(metrics, name: str) -> float | None:
    return None if metrics.get(name) is None else _dice(metrics[name])


def _per_class(metrics, prefix: str) -> list[float]:
    """The ``<prefix><class>`` metrics of a reply as a list, class 1 first."""
    found = {
        int(k.removeprefix(prefix)): _dice(v)
        for k, v in metrics.items()
        if k.startswith(prefix) and k.removeprefix(prefix).isdigit()
    }
    return [found[c] for c in sorted(found)]


def cross_evaluate(
    grid: Grid,
    cfg: FedsegConfig,
    signature: str,
    models: dict[str, dict[str, torch.Tensor]],
    metrics_log: MetricsLog,
    run: Path,
    rounds: dict[str, int | None] | None = None,
    sites: dict[int, str] | None = None,
) -> list[Cell]:
    """Send every checkpoint to every connected site; log and save the matrix.

    ``sites``: the registered node -> site names (by default those of the run folder), which name every cell.

    ``rounds`` names each model's round: a site scores round r's shared weights
    with its own norm tensors of round r (client/site.py), never with whatever
    it wrote last.
    """
    sites = read_nodes(run) if sites is None else sites
    nodes = list(grid.get_node_ids())
    cells = []
    for model, tensors in models.items():
        arrays = to_wire(tensors, cfg.federation.wire_dtype)
        config: dict[str, str | int] = {
            keys.SIGNATURE: signature,
            keys.WIRE_DTYPE: cfg.federation.wire_dtype,
            keys.CROSS_EVAL_MODEL: model,
        }
        if model_round := (rounds or {}).get(model):
            config[keys.SERVER_ROUND] = int(model_round)
        if (run / PLAN_FILE).is_file():  # the run's preprocessing plan, also for a site that never trained
            config[keys.PLAN] = (run / PLAN_FILE).read_text()
        queries = [_query(n, "evaluate", config, arrays) for n in nodes]
        replies = grid.send_and_receive(queries, timeout=cfg.federation.round_timeout_s)
        cells += _cells(model, replies, metrics_log, sites, queries)
    metrics_log.sync()
    cells.sort(key=lambda c: (list(models).index(c.model), c.site))
    _save(run / CROSS_EVAL_FILE, cfg, cells)
    return cells


def _cells(
    model: str, replies: Iterable[Message], metrics_log: MetricsLog, sites: dict[int, str], queries: list[Message]
) -> list[Cell]:
    """One model's cells, each named by its node's site; each failed reply is logged as a failure instead."""
    cells = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if node == SUPERLINK_NODE_ID:  # the SuperLink's error for a node that went away: the query names it
            node = next(
                (q.metadata.dst_node_id for q in queries if q.metadata.message_id == msg.metadata.reply_to_message_id),
                node,
            )
        site = site_name(sites, node, named_site(msg))
        cell = _cell(model, msg, site, sites)
        if isinstance(cell, str):
            log.warning("cross-eval of %s at site %s failed: %s", model, site, cell)
            metrics_log.write(Event.FAILURE, round=None, site=site, stage="cross-eval", reason=cell)
            continue
        cells.append(cell)
        metrics_log.write(Event.CROSS_EVAL, **asdict(cell))
    return cells


def _save(path: Path, cfg: FedsegConfig, cells: list[Cell]) -> None:
    record = {
        "run": cfg.federation.run_name,
        "time": time.time(),
        "held_out_sites": cfg.federation.held_out_sites,
        "cells": [asdict(c) for c in cells],
    }
    atomic_write_text(path, json.dumps(record, indent=2))


def run_checkpoints(run: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int | None]]:
    """The run's last and best global models, labelled with their rounds (once if they coincide), and the rounds.

    Best is sent last: a site keeps the personalized copy of the last model it
    scores (client/site_state.py), and best is the site commands' default.
    """
    ckpt = Checkpoints(run / CHECKPOINT_DIR)
    state = ckpt.state
    if not state.last_round:
        return {}, {}
    last = f"{LAST} (round {state.last_round})"
    if state.best_round == state.last_round or not (ckpt.dir / BEST_CHECKPOINT).is_file():
        return {last: load_file(ckpt.dir / LAST_CHECKPOINT)}, {last: state.last_round}
    best = f"{BEST} (round {state.best_round})"
    return (
        {last: load_file(ckpt.dir / LAST_CHECKPOINT), best: load_file(ckpt.dir / BEST_CHECKPOINT)},
        {last: state.last_round, best: state.best_round},
    )


def resolve_checkpoint(run: Path, name: str) -> Path:
    """``best``, ``last``, ``round-N`` or a file path, as a checkpoint file that exists."""
    ckpt_dir = run / CHECKPOINT_DIR
    named = parse_checkpoint_name(name)
    path = ckpt_dir / named.file if named is not None else Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint '{name}' not found as {path}; use {CHECKPOINT_NAMES} (see {ckpt_dir}) or a .safetensors file"
        )
    return path


def after_training(
    grid: Grid,
    cfg: FedsegConfig,
    signature: str,
    metrics_log: MetricsLog,
    run: Path,
    sites: dict[int, str] | None = None,
) -> None:
    """The cross-site evaluation closing a run; a failure here is logged, never fatal to the run.

    ``sites``: the run's node -> site names, shared with its receiving boundary and strategy."""
    models, rounds = run_checkpoints(run)
    if not cfg.federation.cross_eval or not models:
        return
    try:
        cross_evaluate(grid, cfg, signature, models, metrics_log, run, rounds, sites)
    except Exception:  # the trained model is safe on disk; the evaluation can be rerun on demand
        log.exception("cross-site evaluation failed; rerun it with federation.evaluate_checkpoint")


def on_demand(grid: Grid, cfg: FedsegConfig, signature: str, run: Path) -> None:
    """A run that trains nothing: cross-evaluate one checkpoint of an earlier run at every site."""
    name = cfg.federation.evaluate_checkpoint
    path = resolve_checkpoint(run, name)
    metrics_log = MetricsLog(run)
    metrics_log.write(
        Event.RUN_START,
        run=cfg.federation.run_name,
        config_sha256=cfg.sha256(),
        mode="cross-eval",
        checkpoint=name,
        sites=cfg.federation.sites,
        signature=signature,
    )
    status = "evaluated"
    try:
        wait_for_nodes(
            grid, len(cfg.federation.sites) + len(cfg.federation.held_out_sites), cfg.federation.round_timeout_s
        )
        cross_evaluate(
            grid,
            cfg,
            signature,
            {name: load_file(path)},
            metrics_log,
            run,
            {name: Checkpoints(run / CHECKPOINT_DIR).round_of(name)},
        )
    except Exception as err:
        status = f"failed: {type(err).__name__}"
        raise
    finally:
        log_run_end(metrics_log, status, Checkpoints(run / CHECKPOINT_DIR).state)
