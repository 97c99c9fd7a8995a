"""GPU check: training throughput, CT prediction and a shared-GPU simulation round, on one CUDA GPU.

    .venv/bin/python benchmarks/gpu_check.py [--steps 10] [--skip-simulation]

On a CUDA machine it prints (about 5 minutes on a data-centre GPU):

- training throughput in voxels/s of fedseg's loop (common.training.train_local:
  sampling, augmentation, DiceCE, FedProx) next to a bare PyTorch loop over the
  same model and patches, at 96^3 and 128^3 patches, in fp32, bf16 and fp16,
  with the peak GPU memory of each, and in fp32 without the prefetch thread
  (train.prefetch_batches=0) to show what it is worth;
- the time of the 512x512x400 CT prediction, file to file and inference alone
  (benchmarks/bench_predict.py with train.device=cuda);
- the round time of a 3-site simulation whose sites share the one GPU
  (simulation.gpus_per_site=0.33).

Without a GPU it says so and exits 0. Targets (issue 12): training loop
>= 0.9x the bare loop; CT prediction file to file <= 10 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PATCHES = (96, 128)
PRECISIONS = ("fp32", "bf16", "fp16")
GIB = 1024**3
CT_SHAPE = (512, 512, 400)
SIM_SITES = 3


def no_gpu_message() -> str:
    return (
        f"gpu_check: no CUDA GPU on this machine (torch {torch.__version__}, CUDA build: "
        f"{torch.version.cuda or 'none'}); nothing to measure. Run it where torch.cuda.is_available()."
    )


def training(steps: int) -> None:
    """fedseg's loop vs a bare loop per patch size and precision, with peak GPU memory; fp32 also without prefetch."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from bench_local_training import bare_loop, fixed_batches, synthetic_volume

    from common.config import load_config
    from common.device import compute_for
    from common.model import build_model
    from common.training import train_local

    volumes = [synthetic_volume(np.random.default_rng(i)) for i in range(4)]
    print(f"training, default model, batch 2, {steps} steps (after 2 warm-up steps), voxels/s:")
    for side in PATCHES:
        for precision, prefetch in [*((p, 2) for p in PRECISIONS), ("fp32", 0)]:
            settings = [
                f"data.patch_size=[{side}, {side}, {side}]",
                "train.device=cuda",
                f"train.precision={precision}",
                f"train.prefetch_batches={prefetch}",
            ]
            cfg = load_config(None, [*settings, f"train.local_steps={steps}"])
            warm = load_config(None, [*settings, "train.local_steps=2"])
            compute = compute_for(cfg.train)
            torch.manual_seed(0)
            model = build_model(cfg.model)
            train_local(model, volumes, warm.data, warm.train, {}, 0.0, seed=1)
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            train_local(model, volumes, cfg.data, cfg.train, {}, 0.0, seed=2)
            fedseg_s = time.perf_counter() - start
            fedseg_peak = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
            bare_s = bare_loop(model, fixed_batches(cfg, volumes, steps, seed=2), cfg, compute)
            bare_peak = torch.cuda.max_memory_allocated() / GIB
            voxels = steps * cfg.train.batch_size * side**3
            print(
                f"  {side}^3 {precision} prefetch {prefetch}: fedseg {voxels / fedseg_s:14,.0f} "
                f"(peak {fedseg_peak:5.2f} GiB)  bare {voxels / bare_s:14,.0f} (peak {bare_peak:5.2f} GiB)  "
                f"ratio {bare_s / fedseg_s:.2f} (target >= 0.9)",
                flush=True,
            )


def prediction() -> None:
    """The 512x512x400 CT, file to file and inference alone, on the GPU."""
    sys.path.insert(0, str(HERE))
    from bench_predict import run_modes

    results = run_modes(CT_SHAPE, 64, 0.25, 4, ["fedseg-infer", "fedseg"], ["train.device=cuda"])
    print(
        f"CT prediction file to file: {results['fedseg']['seconds']:.1f} s (target <= 10 s); "
        f"inference alone {results['fedseg-infer']['seconds']:.1f} s"
    )


def simulation() -> None:
    """Round time of three simulated sites sharing the one GPU."""
    from common.config import load_config
    from common.metrics_log import read_events
    from simulations.runner import run_simulation

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                "federation.run_name=gpu-check",
                f"federation.runs_dir={tmp}/runs",
                "federation.rounds=2",
                "federation.cross_eval=false",
                f"simulation.num_sites={SIM_SITES}",
                "simulation.cases_per_site=4",
                "simulation.volume_shape=[96, 96, 64]",
                f"simulation.data_dir={tmp}/data",
                "simulation.cpus_per_site=2",
                f"simulation.ray_num_cpus={2 * SIM_SITES}",
                f"simulation.gpus_per_site={1 / SIM_SITES:.2f}",
                "train.device=cuda",
                "train.local_steps=20",
            ],
        )
        run = run_simulation(cfg, show=lambda line: None)
        rounds = [e for e in read_events(run / "metrics.jsonl") if e["event"] == "round"]
    print(
        f"simulation, {SIM_SITES} sites sharing one GPU (gpus_per_site {cfg.simulation.gpus_per_site}), "
        f"{cfg.train.local_steps} steps each: round times " + ", ".join(f"{r['duration_s']:.1f} s" for r in rounds)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="Timed training steps per patch size and precision.")
    parser.add_argument("--skip-simulation", action="store_true", help="Leave out the simulation (needs flwr and Ray).")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(no_gpu_message())
        return 0
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    training(args.steps)
    prediction()
    if not args.skip_simulation:
        simulation()
    return 0


if __name__ == "__main__":
    sys.exit(main())
