"""Write this site's own model to a folder it keeps: ``fedseg-client export``.

    fedseg-client export --config site.yaml --run RUN_DIR [--weights best|last|round-N] [--personalize] --out FOLDER

The folder (client.site_model) holds the global weights merged with this
site's normalization tensors, the plan, label names, model config and a README
with the provenance; ``fedseg-client predict --model FOLDER`` uses it alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True,
                        help="Run folder from the centre: config.yaml, plan.json, checkpoints/.")
    parser.add_argument("--weights", default="best", help="Global checkpoint: best (default), last or round-N.")
    parser.add_argument("--out", type=Path, required=True, help="New folder for the exported model.")
    parser.add_argument("--personalize", action="store_true",
                        help="First fine-tune the norm layers (and output layer, train.personalize) on this site's "
                             "training cases, keeping the copy with the best validation Dice.")


def run(args: argparse.Namespace) -> int:
    from .site_model import export_site_model

    provenance = export_site_model(config_from_args(args), args.run, args.weights, args.out, args.personalize)
    if personal := provenance.get("personalized"):
        print(f"personalized for {personal['steps']} steps: validation Dice at this site "
              f"{personal['dice_before']:.4f} -> {personal['dice_after']:.4f}")
    dice = provenance.get("site_dice")
    print(f"exported {provenance['weights']} (round {provenance['round'] or 'unknown'}, Dice at this site "
          f"{'unknown' if dice is None else f'{dice:.4f}'}) of run {provenance['run']} to {args.out}")
    print(f"  use it with: fedseg-client predict --model {args.out} --input SCANS --output OUT")
    return 0
