"""Benchmark: predicting a 512x512x400 CT-sized volume, fedseg vs MONAI's plain sliding window.

Writes a synthetic CT (int16 Hounsfield units, LPS, 0.8x0.8x1.0 mm: air around
an elliptic body with an organ and lesions) to a temporary folder, then, each
in a fresh process so that peak memory is its own:

- ``fedseg``: client.predict.predict_file, file to file (load, RAS, crop,
  plan normalization, slab-wise sliding window, back to the input grid, write);
- ``fedseg-infer``: the same sliding-window segmentation on the preprocessed
  volume only;
- ``plain``: monai.inferers.sliding_window_inference on the same preprocessed
  volume, model, window and overlap, then argmax, with MONAI's default of one
  window per forward pass (what the issue measured);
- ``plain-batched``: the same with fedseg's windows per forward pass
  (train.sw_batch_size), to show how much of the gain is batching alone;
- ``monai-buffered``: MONAI's own memory-saving mode, sliding_window_inference
  with ``buffer_steps=1, buffer_dim=-1`` (one slab of windows along the last
  axis at a time, as SlabInferer walks) and fedseg's windows per pass: the
  library alternative SlabInferer has to beat to be kept.

    .venv/bin/python benchmarks/bench_predict.py [--shape 512 512 400] [--threads 2] [--modes fedseg-infer fedseg]
        [--set train.device=cuda --set train.precision=bf16]

Targets (issue 4): fedseg <= 20 s and <= 2.5 GiB peak on 2 cores. Issue 12: file to file
(``fedseg``) <= 1.3x inference alone (``fedseg-infer``) on CPU; the ratio is printed.
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
from typing import Any

import nibabel as nib
import numpy as np
import torch

from common.config import load_config
from common.device import compute_for
from common.model import build_model
from common.plan import ChannelNorm, Plan
from common.reading import load_nifti

SPACING = (0.8, 0.8, 1.0)
LPS = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
AIR, BODY, ORGAN, LESION = -1000.0, 40.0, 60.0, 110.0
GIB = 1024**3
MODES = ("plain", "plain-batched", "monai-buffered", "fedseg-infer", "fedseg")
MODEL = ["model.channels=[8, 16, 32]", "model.strides=[2, 2]", "model.num_res_units=1"]


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, organ/lesion label uint8), built slab by slab to keep the generator small."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((x - cx) / (0.37 * shape[0])) ** 2 + ((y - cy) / (0.27 * shape[1])) ** 2 <= 1
    image = np.empty(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    for z in range(shape[2]):
        t = (z - shape[2] / 2) / (0.35 * shape[2])
        organ = ((x - cx - 40) / 90) ** 2 + ((y - cy) / 60) ** 2 + t**2 <= 1
        lesion = ((x - cx - 60) / 12) ** 2 + ((y - cy + 10) / 12) ** 2 + (t * 8) ** 2 <= 1
        hu = np.where(body, BODY, AIR) + rng.normal(0, 15, size=body.shape)
        hu[organ] += ORGAN - BODY
        hu[lesion] += LESION - ORGAN
        image[..., z] = hu.astype(np.int16)
        label[..., z] = organ.astype(np.uint8) + (lesion & organ)
    return image, label


def ct_plan(image: np.ndarray, label: np.ndarray, roi: int) -> Plan:
    """The plan a federation of such scans gets: native spacing, CT normalization from the organ."""
    fg = image[label > 0][::97].astype(np.float64)
    low, high = np.percentile(fg, [0.5, 99.5])
    norm = ChannelNorm("ct", float(low), float(high), float(fg.mean()), float(fg.std()))
    sx, sy, sz = (abs(v) for v in SPACING)
    nx, ny, nz = image.shape
    return Plan((sx, sy, sz), (roi, roi, roi), (norm,), (nx, ny, nz))


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def cpu_seconds() -> float:
    """User + system CPU time of this process: steadier than wall time on a machine shared with other jobs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(mode: str, work: Path, threads: int, overlap: float, overrides: list[str]) -> dict:
    from client.predict import predict_file
    from client.slab_inferer import InferenceOptions, SlabInferer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(None, [*MODEL, *overrides])
    model = build_model(cfg.model).eval()
    batch = cfg.train.sw_batch_size
    options = InferenceOptions(overlap, batch, compute_for(cfg.train))
    plan = Plan.load(work / "plan.json")
    started, cpu = time.perf_counter(), cpu_seconds()
    if mode == "fedseg":
        predict_file(work / "ct_0000.nii.gz", work / "ct_seg.nii.gz", model, plan, 2, options)
    elif mode == "fedseg-infer":
        image = torch.from_numpy(np.load(work / "prepared.npy"))
        started, cpu = time.perf_counter(), cpu_seconds()
        SlabInferer(model, plan.patch_size, 2, options)(image)
    else:
        from monai.inferers import sliding_window_inference

        image = torch.from_numpy(np.load(work / "prepared.npy"))
        started, cpu = time.perf_counter(), cpu_seconds()
        with torch.no_grad():
            windows = 1 if mode == "plain" else batch
            buffered: dict[str, Any] = {"buffer_steps": 1, "buffer_dim": -1} if mode == "monai-buffered" else {}
            logits = sliding_window_inference(image[None], plan.patch_size, windows, model, overlap=overlap, **buffered)
            logits[0].argmax(0).to(torch.uint8)
    return {
        "mode": mode,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": cpu_seconds() - cpu,
        "peak_gib": peak_gib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--roi", type=int, default=64, help="Window side (the plan's patch size).")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=MODES,
        help="What to time; a mode named twice runs twice (alternate them on a busy machine).",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="Config override, e.g. --set train.device=cuda --set train.precision=bf16.",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.threads, args.overlap, args.overrides)))
        return
    results = run_modes(tuple(args.shape), args.roi, args.overlap, args.threads, args.modes, args.overrides)
    if {"fedseg", "fedseg-infer"} <= results.keys():
        ratio = results["fedseg"]["seconds"] / results["fedseg-infer"]["seconds"]
        print(f"file to file / inference alone: {ratio:.2f}x (target <= 1.3x, issue 12)")
    print("targets: fedseg <= 20 s and <= 2.5 GiB (issue 4); issue's plain figure: 32.7 s, 2.14 GiB fp32")


def run_modes(
    shape: tuple[int, int, int], roi: int, overlap: float, threads: int, modes: list[str], overrides: list[str]
) -> dict[str, dict]:
    """Write the synthetic CT, then time each mode in a fresh process; prints one line per mode."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image, label = synthetic_ct(shape)
        plan = ct_plan(image, label, roi)
        plan.save(work / "plan.json")
        nib.save(nib.Nifti1Image(image, LPS), str(work / "ct_0000.nii.gz"))
        del image, label
        from common.preprocess import prepare_image

        prepared = prepare_image((work / "ct_0000.nii.gz",), plan, file_layout=True)  # as predict_file has it
        np.save(work / "prepared.npy", prepared.numpy())
        del prepared
        cfg = load_config(None, [*MODEL, *overrides])
        print(
            f"volume {shape} int16 CT, model {MODEL}, window {roi}^3, overlap {overlap}, "
            f"{cfg.train.sw_batch_size} windows per pass (plain: 1), {threads} threads, "
            f"device {cfg.train.device}, precision {cfg.train.precision}"
        )
        results = {}
        for mode in modes:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--work",
                    str(work),
                    "--threads",
                    str(threads),
                    "--overlap",
                    str(overlap),
                    *(f"--set={o}" for o in overrides),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(
                f"{mode:<14} {r['seconds']:7.1f} s   CPU {r['cpu_seconds']:7.1f} s   peak RSS {r['peak_gib']:.2f} GiB",
                flush=True,
            )
        if "fedseg" in results:
            seg = load_nifti(work / "ct_seg.nii.gz")
            print(f"output: shape {seg.shape}, dtype {seg.get_data_dtype()}, axcodes {nib.aff2axcodes(seg.affine)}")
        return results


if __name__ == "__main__":
    main()
