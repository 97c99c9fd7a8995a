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
  (train.sw_batch_size), to show how much of the gain is batching alone.

    .venv/bin/python benchmarks/bench_predict.py [--shape 512 512 400] [--threads 2]

Targets (issue 4): fedseg <= 20 s and <= 2.5 GiB peak on 2 cores.
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
import numpy as np
import torch

from common.config import load_config
from common.model import build_model
from common.plan import ChannelNorm, Plan

SPACING = (0.8, 0.8, 1.0)
LPS = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
AIR, BODY, ORGAN, LESION = -1000.0, 40.0, 60.0, 110.0
GIB = 1024 ** 3
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
        organ = ((x - cx - 40) / 90) ** 2 + ((y - cy) / 60) ** 2 + t ** 2 <= 1
        lesion = ((x - cx - 60) / 12) ** 2 + ((y - cy + 10) / 12) ** 2 + (t * 8) ** 2 <= 1
        hu = np.where(body, BODY, AIR) + rng.normal(0, 15, size=body.shape)
        hu[organ] += ORGAN - BODY
        hu[lesion] += LESION - ORGAN
        image[..., z] = hu.astype(np.int16)
        label[..., z] = organ.astype(np.uint8) + (lesion & organ)
    return image, label


def ct_plan(image: np.ndarray, label: np.ndarray, roi: int) -> Plan:
    """The plan a federation of such scans gets: native spacing, CT normalization from the organ."""
    fg = image[label > 0][:: 97].astype(np.float64)
    low, high = np.percentile(fg, [0.5, 99.5])
    norm = ChannelNorm("ct", float(low), float(high), float(fg.mean()), float(fg.std()))
    return Plan(tuple(abs(v) for v in SPACING), (roi, roi, roi), (norm,), tuple(image.shape))


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def child(mode: str, work: Path, threads: int, overlap: float) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(None, MODEL)
    model = build_model(cfg.model).eval()
    batch = cfg.train.sw_batch_size
    plan = Plan.load(work / "plan.json")
    started = time.perf_counter()
    if mode == "fedseg":
        from client.predict import predict_file

        predict_file(work / "ct_0000.nii.gz", work / "ct_seg.nii.gz", model, plan, 2, overlap, batch)
    elif mode == "fedseg-infer":
        from client.predict import SlabInferer

        image = torch.from_numpy(np.load(work / "prepared.npy"))
        started = time.perf_counter()
        SlabInferer(model, plan.patch_size, overlap, 2, batch)(image)
    else:
        from monai.inferers import sliding_window_inference

        image = torch.from_numpy(np.load(work / "prepared.npy"))
        started = time.perf_counter()
        with torch.no_grad():
            windows = batch if mode == "plain-batched" else 1
            logits = sliding_window_inference(image[None], plan.patch_size, windows, model, overlap=overlap)
            logits[0].argmax(0).to(torch.uint8)
    return {"mode": mode, "seconds": time.perf_counter() - started, "peak_gib": peak_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--roi", type=int, default=64, help="Window side (the plan's patch size).")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.threads, args.overlap)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image, label = synthetic_ct(tuple(args.shape))
        plan = ct_plan(image, label, args.roi)
        plan.save(work / "plan.json")
        nib.save(nib.Nifti1Image(image, LPS), str(work / "ct_0000.nii.gz"))
        del image, label
        from common.preprocess import prepare_image

        prepared, _ = prepare_image((work / "ct_0000.nii.gz",), plan)
        np.save(work / "prepared.npy", prepared.numpy())
        del prepared
        print(f"volume {tuple(args.shape)} int16 CT, model {MODEL}, window {args.roi}^3, overlap {args.overlap}, "
              f"{load_config(None).train.sw_batch_size} windows per pass (plain: 1), {args.threads} threads")
        results = {}
        for mode in ("plain", "plain-batched", "fedseg-infer", "fedseg"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--work", str(work), "--threads", str(args.threads),
                 "--overlap", str(args.overlap)], capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"{mode:<14} {r['seconds']:7.1f} s   peak RSS {r['peak_gib']:.2f} GiB", flush=True)
        seg = nib.load(str(work / "ct_seg.nii.gz"))
        print(f"output: shape {seg.shape}, dtype {seg.get_data_dtype()}, axcodes {nib.aff2axcodes(seg.affine)}")
        print("targets: fedseg <= 20 s and <= 2.5 GiB (issue 4); issue's plain figure: 32.7 s, 2.14 GiB fp32")


if __name__ == "__main__":
    main()
