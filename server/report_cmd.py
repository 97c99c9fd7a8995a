"""Plots and a one-page summary of a run, from its metrics.jsonl (also while it is still running).

Writes <run>/report/: Dice per site per round with the federation mean and
weighted Dice, training loss and proximal term, seconds and bytes per round,
failures marked, the cross-site evaluation, summary.md and summary.json;
with ``--tensorboard`` also the log's numbers as TensorBoard event files
(server/tensorboard.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import UserError

TENSORBOARD_DEFAULT = Path("-")
"""--tensorboard without a folder: the run's report/tensorboard."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="The run directory, e.g. runs/sim-20250101-120000.")
    parser.add_argument(
        "--tensorboard",
        type=Path,
        nargs="?",
        const=TENSORBOARD_DEFAULT,
        metavar="DIR",
        help="Also mirror metrics.jsonl to TensorBoard event files in DIR (default: "
        "<run>/report/tensorboard); view them with: tensorboard --logdir DIR.",
    )


def run(args: argparse.Namespace) -> int:
    from common.runs import METRICS_FILE

    from .report import write_report

    metrics = args.run / METRICS_FILE
    if not metrics.is_file():
        raise UserError(
            f"{metrics} not found: give the run directory that holds {METRICS_FILE} "
            "(fedseg-sim and fedseg-server write one per run under runs/)."
        )
    summary = write_report(args.run)
    print(f"report: {summary}\nplots: {summary.parent}")
    if args.tensorboard is not None:
        from .tensorboard import TensorBoardError, write_mirror

        try:
            folder, count = write_mirror(
                args.run, None if args.tensorboard == TENSORBOARD_DEFAULT else args.tensorboard
            )
        except TensorBoardError as err:
            raise UserError(str(err)) from err
        print(f"tensorboard: {count} scalars of {metrics} in {folder} (tensorboard --logdir {folder})")
    return 0
