"""Benchmark: the Dice cost of central differential privacy on the small synthetic federation.

Runs the real local simulation (same ServerApp and ClientApp as a deployment)
without DP and with ``privacy.noise_multiplier`` at the given levels, with
the same data, seed and budget, and prints the final and best mean Dice and
the epsilon spent (at ``privacy.delta``) from each run's metrics log.

Why the noise levels are so small: the server adds N(0, (zC/m)^2) to every
coordinate of the averaged model, and with m = 3 sites that noise does not
shrink with the number of sites the way it does for thousands of phones.
The printed epsilon shows what each level buys.

    .venv/bin/python benchmarks/bench_dp.py [--noise 0.001 0.01] [--rounds 4] [--sites 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common.config import load_config
from common.metrics_log import read_events

SMALL = [
    "model.channels=[8, 16, 32]",
    "model.strides=[2, 2]",
    "data.patch_size=[16, 16, 16]",
    "train.local_steps=15",
    "train.batch_size=2",
    "train.lr=0.003",
    "train.hd95=false",
    "simulation.cases_per_site=4",
    "simulation.volume_shape=[32, 32, 24]",
    "simulation.ray_num_cpus=2",
    "simulation.cpus_per_site=1",
]
CLIPPING_NORM = 2.0
"""Just above the honest update norms of this setting (about 1.4 to 1.7), so clipping barely bites."""


def run(noise: float, rounds: int, sites: int, work: Path) -> dict:
    from simulations.runner import run_simulation

    cfg = load_config(
        None,
        [
            *SMALL,
            f"federation.rounds={rounds}",
            f"simulation.num_sites={sites}",
            f"simulation.data_dir={work / 'data'}",
            f"federation.runs_dir={work / 'runs'}",
            f"federation.run_name=dp-{noise:g}",
            f"privacy.noise_multiplier={noise}",
            f"privacy.clipping_norm={CLIPPING_NORM}",
        ],
    )
    events = list(read_events(run_simulation(cfg, show=lambda line: None) / "metrics.jsonl"))
    dice = [e["dice_mean"] for e in events if e["event"] == "round"]
    privacy = [e for e in events if e["event"] == "privacy"]
    return {
        "noise": noise,
        "final": dice[-1],
        "best": max(d for d in dice if d is not None),
        "dice": dice,
        "epsilon": privacy[-1]["epsilon"] if privacy else None,
        "delta": cfg.privacy.delta,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.001, 0.01])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.sites} sites, {args.rounds} rounds, clipping norm {CLIPPING_NORM}, one seed")
    print(f"{'noise z':>8} {'final Dice':>11} {'best Dice':>10} {'cost':>7} {'epsilon':>12}  Dice per round")
    with tempfile.TemporaryDirectory(prefix="fedseg-dp-") as tmp:
        baseline = None
        for noise in [0.0, *args.noise]:
            r = run(noise, args.rounds, args.sites, Path(tmp))
            baseline = r["final"] if baseline is None else baseline
            eps = "off" if r["epsilon"] is None else f"{r['epsilon']:.4g}"
            per_round = " ".join(f"{d:.3f}" for d in r["dice"])
            print(
                f"{noise:>8g} {r['final']:>11.4f} {r['best']:>10.4f} {baseline - r['final']:>7.4f} {eps:>12}  "
                f"{per_round}",
                flush=True,
            )
        print(f"epsilon at delta {r['delta']:g}, site-level, Gaussian DP exact composition (server/dp.py)")


if __name__ == "__main__":
    main()
