"""Compare federated strategies under strong scanner shift, honestly and reproducibly.

On one synthetic federation (simulations.synthetic, every site a different
scanner) plus held-out sites that never train, runs for every seed: each site
alone, all data pooled, and the federated methods below through the real
ServerApp and ClientApp on Flower's simulation engine. Every method gets the
same budget (rounds x local steps per site, same batch size, same initial
weights per seed); only the method's own settings differ. Writes
``results.jsonl`` (one line per method and seed, appended as they finish, so
an interrupted comparison resumes), ``results.md`` (table, command, seeds,
machine) and plots into the output folder.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from pathlib import Path

from common.cli import UserError

log = logging.getLogger("fedseg.compare")

# Benchmark size: a small 3D U-Net and small volumes, so that 9 methods x 3 seeds fit
# in about half an hour on 2 CPU cores. --set overrides any of it.
BENCHMARK = [
    "model.channels=[8, 16, 32]",
    "model.strides=[2, 2]",
    "model.num_res_units=1",
    "train.local_steps=5",
    "train.hd95=false",
    "federation.rounds=20",
    "federation.cross_eval=true",
    "data.val_fraction=0.3",
    "simulation.num_sites=3",
    "simulation.held_out_sites=1",
    "simulation.cases_per_site=10",
    "simulation.shift_strength=1.0",
    "simulation.volume_shape=[48, 48, 32]",
    "simulation.test_cases_per_site=5",
    "simulation.ray_num_cpus=2",
    "simulation.cpus_per_site=2",
    "simulation.data_dir=data/compare",
]
QUICK = [
    "model.channels=[4, 8, 16]",
    "train.local_steps=2",
    "train.adapt_norm_steps=2",
    "federation.rounds=2",
    "simulation.num_sites=2",
    "simulation.cases_per_site=4",
    "simulation.volume_shape=[32, 32, 24]",
    "data.val_fraction=0.25",
    "simulation.test_cases_per_site=1",
]
DEFAULT_SEEDS = [0, 1, 2]
DEFAULT_METHODS = ["local", "pooled", "fedavg", "fedbn", "fedseg"]
"""What fits in about 30 minutes on 2 cores with 3 seeds; ``--methods all`` runs every method."""
BUDGETS = {
    "equal": [],
    "long": ["federation.rounds=60"],
}
"""equal: every method sees the same number of patches as 20 rounds x 5 local steps per site
(100 steps; aggregating every 5 steps instead of every 10 was better for every federated
method measured but FedAvg at the long budget, see docs/results.md).
long: three times that, long enough for the pooled and local-only learning curves to flatten
(the report's curves show whether they did)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="Tiny sizes for tests: 2 sites, 2 rounds, tiny model.")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help=f"Seeds of model init and sampling (default {DEFAULT_SEEDS})."
    )
    parser.add_argument(
        "--mu-sweep",
        type=float,
        nargs="*",
        default=[],
        help="Extra FedProx mu values for fedseg's default (default: none).",
    )
    parser.add_argument(
        "--methods", nargs="+", help=f"Methods to run, or 'all' (default: {' '.join(DEFAULT_METHODS)})."
    )
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="equal",
        help="equal: 20 rounds x 5 local steps per site (default); long: 60 rounds, until the "
        "baselines' learning curves have flattened.",
    )
    parser.add_argument(
        "--pretrained",
        type=Path,
        help="Adds the method fedseg-pretrained: fedseg's default starting from these weights "
        "(model.init_weights: another federation's run folder or checkpoint, an export "
        "folder, a .safetensors file or a MONAI bundle) instead of the seeded init.",
    )
    parser.add_argument("--out", type=Path, help="Output folder (default runs/compare-<time>); reused to resume.")


def run(args: argparse.Namespace) -> int:
    from common.config import CentreFile, ConfigError, apply_overrides, from_dict, read_yaml

    from .compare_run import PRETRAINED_METHOD, Comparison, methods_for

    raw = read_yaml(args.config) if args.config else {}
    overrides = [*BENCHMARK, *BUDGETS[args.budget], *(QUICK if args.quick else []), *args.overrides]
    try:
        base = from_dict(apply_overrides(raw, overrides), "compare settings", CentreFile)
    except ConfigError as err:
        raise UserError(str(err)) from err
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else DEFAULT_SEEDS)
    pretrained = str(args.pretrained.resolve()) if args.pretrained else ""
    if pretrained:  # a wrong path fails here, not after the other methods' runs
        from server.pretrained import PretrainedError, weights_file

        try:
            weights_file(Path(pretrained))
        except PretrainedError as err:
            raise UserError(f"--pretrained: {err}") from err
    methods = methods_for(base, args.mu_sweep, pretrained)
    chosen = args.methods or DEFAULT_METHODS + [f"fedseg-mu{m:g}" for m in args.mu_sweep] + (
        [PRETRAINED_METHOD] if pretrained else []
    )
    if chosen != ["all"]:
        unknown = sorted(set(chosen) - {m.name for m in methods})
        if unknown:
            raise UserError(f"unknown method(s) {unknown}; choose from {[m.name for m in methods]} or 'all'")
        methods = [m for m in methods if m.name in chosen]
    out = args.out or Path(base.federation.runs_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    comparison = Comparison(base, methods, seeds, out.resolve(), command_line(args, out))
    comparison.run(show=print)
    print(f"table: {out / 'results.md'}\nraw results: {out / 'results.jsonl'}")
    return 0


def command_line(args: argparse.Namespace, out: Path) -> str:
    """The exact command that reproduces (or resumes) this comparison."""
    parts = ["fedseg-sim", "compare"]
    if args.config:
        parts += ["--config", str(args.config)]
    if args.quick:
        parts.append("--quick")
    if args.budget != "equal":
        parts += ["--budget", args.budget]
    for name, values in (("--seeds", args.seeds), ("--mu-sweep", args.mu_sweep), ("--methods", args.methods)):
        if values:
            parts += [name, *map(str, values)]
    if args.pretrained:
        parts += ["--pretrained", str(args.pretrained)]
    for item in args.overrides:
        parts += ["--set", item]
    return shlex.join([*parts, "--out", str(out)])
