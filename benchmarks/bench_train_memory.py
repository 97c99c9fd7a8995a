"""Benchmark: peak memory of a site training on 512x512x400 CT cases.

Writes a small nnU-Net dataset of synthetic CT cases (benchmarks/bench_predict.py's
generator) to a temporary folder and, in a fresh process, does what a site
does in its first round: preflight check, fingerprint, plan, preprocess into
the on-disk cache, then ``--steps`` optimizer steps of the default model on
the plan's patches (memory-mapped volumes, foreground oversampling,
augmentation). Prints the time of each stage and the process's peak RSS.

    .venv/bin/python benchmarks/bench_train_memory.py [--cases 2] [--steps 3] [--threads 2]

Target (issue 4): peak <= 3 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import GIB, LPS, synthetic_ct  # noqa: E402


def write_dataset(root: Path, cases: int, shape: tuple[int, int, int]) -> None:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    for i in range(cases):
        image, label = synthetic_ct(shape, seed=i)
        nib.save(nib.Nifti1Image(image, LPS), str(root / "imagesTr" / f"ct_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, LPS), str(root / "labelsTr" / f"ct_{i:03d}.nii.gz"))


def child(root: Path, state: Path, steps: int, threads: int) -> dict:
    from client.site_data import SiteData
    from client.site_state import SiteState
    from common.config import load_config
    from common.params import run_model, select
    from common.training import train_local

    torch.set_num_threads(threads)
    cfg = load_config(
        None,
        [
            f"site.data_dir={root}",
            f"site.state_dir={state}",
            "site.name=bench",
            "model.out_channels=3",
            f"train.local_steps={steps}",
            "data.val_fraction=0.5",
        ],
    )
    times = {}
    start = time.perf_counter()
    data = SiteData.open(cfg, SiteState(state))  # check + fingerprint + site-local plan
    times["check+fingerprint+plan"] = time.perf_counter() - start
    start = time.perf_counter()
    volumes = data.volumes(data.train_ids)
    times["preprocess+cache"] = time.perf_counter() - start
    model, split, _ = run_model(cfg)
    start = time.perf_counter()
    train_local(model, volumes, data.cfg.data, cfg.train, select(model, split.trainable_shared), 0.01, seed=0)
    times["train"] = time.perf_counter() - start
    return {
        "times": times,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "patch": list(data.plan.patch_size),
        "spacing": list(data.plan.target_spacing),
        "cached_shape": list(volumes[0].image.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child / "Dataset900_CT", args.child / "state", args.steps, args.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp) / "Dataset900_CT", args.cases, tuple(args.shape))
        out = subprocess.run(
            [sys.executable, __file__, "--child", tmp, "--steps", str(args.steps), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"{args.cases} cases of {tuple(args.shape)} (int16 CT), default model, plan spacing {r['spacing']}, "
        f"patch {r['patch']}, {args.steps} steps, {args.threads} threads"
    )
    for stage, seconds in r["times"].items():
        print(f"  {stage:<24} {seconds:7.1f} s")
    print(f"peak RSS {r['peak_gib']:.2f} GiB (target <= 3 GiB)")


if __name__ == "__main__":
    main()
