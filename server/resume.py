"""Where a restarted server picks up a run, so that no round is lost or logged twice.

A round is complete once its summary line (``"event": "round"``) is in the
metrics log; its checkpoint is written earlier, during aggregation, and the
summary only when the next round's training replies bring its evaluation. A
server killed in between has a checkpoint for round k but no summary, so it
must redo round k, not skip it. The resume point is therefore the last round with a
summary line, and the weights are the newest per-round checkpoint not after it
(a round skipped for lack of quorum has a summary but no checkpoint: the model
it kept is the previous one). Lines of any later, unfinished round are dropped
from the log, by an atomic rewrite, before the resumed run appends.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import FedsegConfig, load_config
from common.files import atomic_write_text, read_jsonl
from common.metrics_log import Event, MetricsLog, read_events
from common.runs import METRICS_FILE, SERVER_CONFIG_FILE

if TYPE_CHECKING:  # only the ServerApp loads weights: a refused restart (restarted_config) answers without torch
    import torch

    from .checkpoints import Checkpoints

log = logging.getLogger("fedseg.server")


def last_complete_round(path: Path) -> int:
    return max((e.get("round", 0) for e in read_events(path, Event.ROUND)), default=0)


def truncate_log(path: Path, last_round: int) -> int:
    """Drop lines of rounds after ``last_round`` (and a torn last line); returns how many went."""
    if not path.is_file():
        return 0
    keep = [e for e in read_jsonl(path) if (e.get("round") or 0) <= last_round]
    dropped = len(path.read_text(encoding="utf-8").splitlines()) - len(keep)
    if dropped:
        atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in keep))
    return dropped


@dataclass(frozen=True)
class ResumePoint:
    done: int
    """Rounds already complete (each has its summary line)."""
    model_round: int
    """The round whose checkpoint the run continues from; 0: the initial model."""
    weights: dict[str, torch.Tensor] | None
    """That checkpoint, or None for a fresh start."""


def resume_point(run: Path, checkpoints: Checkpoints) -> ResumePoint:
    """Where the run continues: rounds done, and the global weights (with their round) to continue from."""
    metrics = Path(run) / METRICS_FILE
    done = last_complete_round(metrics)
    dropped = truncate_log(metrics, done)
    saved = checkpoints.saved_rounds(done)
    if dropped:
        log.warning("resuming after round %d: dropped %d log line(s) of the unfinished round", done, dropped)
    if not saved:
        return ResumePoint(done, 0, None)
    return ResumePoint(done, saved[0], checkpoints.round_weights(saved[0]))


OPERATIONAL = (
    "server.",
    "federation.round_timeout_s",
    "federation.poll_interval_s",
    "federation.evaluate_checkpoint",
    "simulation.ray_address",
    "simulation.ray_num_cpus",
)
"""Keys a restart may change freely: where and how the centre runs, not what the run trains."""


class ConfigChanged(ValueError):
    """A restarted run's configuration file differs from the run's own; the message lists the keys."""


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "sites":
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(before: FedsegConfig, after: FedsegConfig) -> dict[str, list[object]]:
    """Dotted key -> [the run's value, the new value], for every training setting that differs."""
    old, new = _flat(before.to_dict()), _flat(after.to_dict())
    return {k: [old[k], new[k]] for k in old if old[k] != new[k] and not k.startswith(OPERATIONAL)}


def restarted_config(cfg: FedsegConfig, run: Path, allow_change: bool) -> FedsegConfig:
    """The configuration a (re)started run uses: its own, kept in its folder, when it was started before.

    A restart with ``--run-name`` re-reads a configuration file that may have
    been edited since; taking it silently would change the run half-way (its
    round count, its steps) while its log and report still describe the old
    one. So the run's own configuration wins, a file that differs is refused
    with the keys that differ, and with ``allow_change`` the new one is taken
    and the change written to the metrics log. Operational keys (``OPERATIONAL``)
    follow the new file.
    """
    path = Path(run) / SERVER_CONFIG_FILE
    if not path.is_file():
        return cfg
    own = load_config(path)
    changes = config_changes(own, cfg)
    if not changes:
        return cfg
    listed = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in changes.items())
    if not allow_change:
        raise ConfigChanged(
            f"run {cfg.federation.run_name} was started with another configuration ({path}): "
            f"{listed}. Start it again with the run's own settings, or pass --allow-config-change "
            "to change them (the change is written to the run's metrics log)."
        )
    log.warning("run %s: configuration changed on restart: %s", cfg.federation.run_name, listed)
    metrics_log = MetricsLog(run)
    metrics_log.write(Event.CONFIG_CHANGE, changes=changes)
    metrics_log.close()
    return cfg
