"""Write this site's own model to a folder it keeps: ``fedseg-client export``.

    fedseg-client export --config site.yaml --run RUN_DIR [--weights best|last|round-N] [--personalize] --out FOLDER

The folder (client.site_model) holds round r's global weights merged with this
site's normalization tensors of round r of that run, the plan, label names,
model config and a README with the provenance (run, round, the Dice this site
measured for exactly that model); ``fedseg-client predict --model FOLDER``
uses it alone. RUN_DIR is what ``fedseg-server site-package`` wrote for this
site.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import add_weights_argument, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", type=Path, required=True, help="Run folder from the centre: config.yaml, plan.json, checkpoints/."
    )
    add_weights_argument(parser, "; with --personalize, the personalized copy's")
    parser.add_argument("--out", type=Path, required=True, help="New folder for the exported model.")
    parser.add_argument(
        "--personalize",
        action="store_true",
        help="Export the personalized copy this site's cross-site evaluation fine-tuned (norm layers, "
        "and the output layer by train.personalize) and scored on its validation cases.",
    )


def run(args: argparse.Namespace) -> int:
    from .site_model import export_site_model

    provenance = export_site_model(config_from_args(args), args.run, args.weights, args.out, args.personalize)
    if personal := provenance.get("personalized"):
        print(
            f"personalized copy of round {personal['round']} ({personal['steps']} steps): validation Dice at this "
            f"site {personal['dice_before']:.4f} -> {personal['dice_after']:.4f} on "
            f"{len(personal['validation_cases'])} validation case(s): {', '.join(personal['validation_cases'])}"
        )
    dice = provenance.get("site_dice")
    print(
        f"exported {provenance['weights']} (round {provenance['round'] or 'unknown'}, Dice at this site "
        f"{'unknown' if dice is None else f'{dice:.4f}'}) of run {provenance['run']} to {args.out}"
    )
    print(f"  use it with: fedseg-client predict --model {args.out} --input SCANS --output OUT")
    return 0
