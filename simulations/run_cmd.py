"""Run the local multi-site simulation on synthetic data with strong scanner shift.

Generates the sites (or reuses them), runs the same ServerApp and ClientApp a
deployment runs on Flower's simulation engine, shows progress per round and
writes runs/<run>/metrics.jsonl, checkpoints/ and config.yaml.
"""

from __future__ import annotations

import argparse
import sys

from common.cli import UserError, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", type=int, help="Shortcut for --set simulation.num_sites=N.")
    parser.add_argument("--rounds", type=int, help="Shortcut for --set federation.rounds=N.")
    parser.add_argument("--run-name", help="Shortcut for --set federation.run_name=NAME (same name: resume).")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="Resume a run with a configuration that differs from the one it started with (the "
        "change is written to its metrics log); without it such a restart is refused.",
    )


def run(args: argparse.Namespace) -> int:
    from .runner import RunFailed, SimulationError, run_simulation

    shortcuts = {
        "simulation.num_sites": args.sites,
        "federation.rounds": args.rounds,
        "federation.run_name": args.run_name,
    }
    cfg = config_from_args(args, [f"{k}={v}" for k, v in shortcuts.items() if v is not None])
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
