"""Plots and a one-page summary of a run, from its metrics.jsonl (also while it is still running).

Writes <run>/report/: Dice per site per round with the federation mean and
weighted Dice, training loss and proximal term, seconds and bytes per round,
failures marked, the cross-site evaluation, summary.md and summary.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="The run directory, e.g. runs/sim-20250101-120000.")


def run(args: argparse.Namespace) -> int:
    from common.runs import METRICS_FILE

    from .report import write_report

    metrics = args.run / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"{metrics} not found: give the run directory that holds {METRICS_FILE} "
                        "(fedseg-sim and fedseg-server write one per run under runs/).")
    summary = write_report(args.run)
    print(f"report: {summary}\nplots: {summary.parent}")
    return 0
