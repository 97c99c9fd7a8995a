"""Run the local multi-site simulation on synthetic data with strong scanner shift.

Generates the sites (or reuses them), runs the same ServerApp and ClientApp a
deployment runs on Flower's simulation engine, shows progress per round and
writes runs/<run>/metrics.jsonl, checkpoints/ and config.yaml.
"""

from __future__ import annotations

import argparse
import sys

from common.cli import ROUNDS, RUN_NAME, Shortcut, UserError, add_allow_config_change, add_shortcuts, config_from_args

SITES = Shortcut("--sites", "simulation.num_sites")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_shortcuts(parser, SITES, ROUNDS, RUN_NAME)
    add_allow_config_change(parser)


def run(args: argparse.Namespace) -> int:
    from .runner import RunFailed, SimulationError, run_simulation

    cfg = config_from_args(args)
    try:
        run_dir = run_simulation(cfg, allow_config_change=args.allow_config_change)
    except RunFailed as err:  # it ran, and failed: exit 1, as fedseg-server does
        print(f"fedseg-sim run: {err}", file=sys.stderr)
        return 1
    except SimulationError as err:
        raise UserError(str(err)) from err
    print(
        f"metrics log: {run_dir / 'metrics.jsonl'}\ncheckpoints: {run_dir / 'checkpoints'}\n"
        f"config: {run_dir / 'config.yaml'}"
    )
    return 0
