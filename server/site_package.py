"""Package a finished run for one site: ``fedseg-server site-package``.

    fedseg-server site-package --run RUN_DIR --site NAME --out FOLDER

A site's ``export``, ``predict --run`` and ``report`` need the centre's facts
of a run: the model (config.yaml), the plan, the global checkpoints of the
kept rounds, and the site's own Dice. This command writes exactly that, as a
run folder the site passes to ``--run``, so no one copies folders by hand:

    config.yaml        the site's view of the run (common.runs.site_view): model, data, train, run name and id;
                       no centre path, no other site, no server or privacy setting
    plan.json          the federation's preprocessing plan
    checkpoints/       round-NNNN, best and last global weights and state.json (which round best and last are)
    metrics.jsonl      this site's own events, and each round's federation Dice (no other site's)
    cross-eval.json    this site's cells of the cross-site evaluation

The server optimizer's moments stay at the centre: a site never needs them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.cli import UserError
from common.files import atomic_copy, atomic_write_text, read_jsonl
from common.metrics_log import EVENT, TIME, Event, is_kind
from common.runs import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    CHECKPOINT_STATE,
    CONFIG_FILE,
    CROSS_EVAL_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    PLAN_FILE,
    ROUND_CHECKPOINT,
    site_view,
)

ROUND_FIELDS = (EVENT, TIME, "round", "dice_mean")
"""What a site gets of a federation-wide ``round`` event: the federation's Dice, not who took part."""
RUN_END_FIELDS = (EVENT, TIME, "status", "rounds_completed", "best_round", "best_dice")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="The run directory at the centre (runs/<run_name>).")
    parser.add_argument("--site", required=True, help="The site the package is for (its name in the run).")
    parser.add_argument("--out", type=Path, required=True, help="New folder to hand to the site (its --run).")


def site_events(run: Path, site: str) -> list[dict[str, Any]]:
    """The metrics-log lines a site may see: its own, and the federation's Dice per round."""
    kept = []
    for event in read_jsonl(run / METRICS_FILE):
        if event.get("site") == site:
            kept.append(event)
        elif is_kind(event, Event.ROUND):
            kept.append({k: event[k] for k in ROUND_FIELDS if k in event})
        elif is_kind(event, Event.RUN_END):
            kept.append({k: event[k] for k in RUN_END_FIELDS if k in event})
    return kept


def package_run(run: Path, site: str, out: Path) -> list[Path]:
    """Write the site's package of ``run`` into ``out`` (see the module docstring); returns the files written."""
    from common.config import load_config

    if not (run / CONFIG_FILE).is_file() or not (run / CHECKPOINT_DIR / CHECKPOINT_STATE).is_file():
        raise UserError(
            f"{run} is not a run folder with checkpoints (it needs {CONFIG_FILE} and "
            f"{CHECKPOINT_DIR}/{CHECKPOINT_STATE}); give the folder under federation.runs_dir."
        )
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new folder for the site's package.")
    cfg = load_config(run / CONFIG_FILE)
    events = site_events(run, site)
    known = {*cfg.federation.sites, *cfg.federation.held_out_sites}
    if site not in known and not any(e.get("site") == site for e in events):
        raise UserError(
            f"site {site!r} took no part in run {run.name}: its sites are {sorted(known) or 'unnamed'}; "
            "pass --site with the site's name as in its site.yaml."
        )
    written = []

    def keep(source: Path, name: str) -> None:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_copy(source, target)
        written.append(target)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, site_view(cfg).to_yaml())
    written.append(out / CONFIG_FILE)
    if (run / PLAN_FILE).is_file():
        keep(run / PLAN_FILE, PLAN_FILE)
    state = json.loads((run / CHECKPOINT_DIR / CHECKPOINT_STATE).read_text())
    for server_round in range(1, int(state.get("last_round", 0)) + 1):
        name = ROUND_CHECKPOINT.format(server_round)
        if (run / CHECKPOINT_DIR / name).is_file():
            keep(run / CHECKPOINT_DIR / name, f"{CHECKPOINT_DIR}/{name}")
    for name in (BEST_CHECKPOINT, LAST_CHECKPOINT, CHECKPOINT_STATE):
        if (run / CHECKPOINT_DIR / name).is_file():
            keep(run / CHECKPOINT_DIR / name, f"{CHECKPOINT_DIR}/{name}")
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(e) + "\n" for e in events))
    written.append(out / METRICS_FILE)
    if (run / CROSS_EVAL_FILE).is_file():
        matrix = json.loads((run / CROSS_EVAL_FILE).read_text())
        mine = {
            "run": matrix.get("run"),
            "time": matrix.get("time"),
            "cells": [c for c in matrix.get("cells", []) if c.get("site") == site],
        }
        atomic_write_text(out / CROSS_EVAL_FILE, json.dumps(mine, indent=2))
        written.append(out / CROSS_EVAL_FILE)
    return written


def run(args: argparse.Namespace) -> int:
    written = package_run(args.run, args.site, args.out)
    print(f"packaged run {args.run.name} for site {args.site}: {len(written)} files in {args.out}")
    print(f"  at the site: fedseg-client export --config site.yaml --run {args.out.name} --out MODEL_FOLDER")
    return 0
