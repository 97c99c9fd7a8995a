"""Benchmark: local-training throughput and bytes on the wire per site and round.

Prints the throughput (voxels/s) of fedseg's local training loop
(common.loops.train_local: patch sampling, augmentation, DiceCE, FedProx)
next to a bare PyTorch loop over the same model and the same patches, in the
same process; and the bytes a site sends per round (fp32 and fp16 on the
wire) next to the fp32 size of the model's unique parameters.

    .venv/bin/python benchmarks/bench_local_training.py [--steps 20] [--threads 2]

Targets (issue 2): throughput ratio >= 0.95; bytes ratio <= 1.0 (fp16 <= 0.5).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common.config import load_config
from common.loops import PatchSampler, make_optimizer, seg_loss, train_local
from common.model import build_model
from common.params import select, split_parameters
from common.wire import to_wire

VOLUME_SHAPE = (96, 96, 64)
PATCH = ["data.patch_size=[32, 32, 32]"]
"""The patch a plan picks for small synthetic volumes; fixed so runs compare."""
LESION_RADIUS = 4


def synthetic_volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = rng.normal(size=(1, *VOLUME_SHAPE)).astype(np.float32)
    label = np.zeros((1, *VOLUME_SHAPE), dtype=np.uint8)
    cx, cy, cz = (s // 2 for s in VOLUME_SHAPE)
    r = LESION_RADIUS
    label[0, cx - r:cx + r, cy - r:cy + r, cz - r:cz + r] = 1
    image[label.astype(bool)] += 2.0
    return image, label


def bare_loop(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg) -> float:
    """Plain PyTorch: forward, DiceCE, backward, step; nothing else."""
    model.train()
    optimizer = make_optimizer(model, cfg.train)
    criterion = seg_loss()
    start = time.perf_counter()
    for image, label in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(image), label)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [*PATCH, f"train.local_steps={args.steps}", *args.overrides])
    volumes = [synthetic_volume(np.random.default_rng(i)) for i in range(4)]
    voxels_per_step = cfg.train.batch_size * int(np.prod(cfg.data.patch_size))

    torch.manual_seed(0)
    model = build_model(cfg.model)
    split = split_parameters(model, cfg.train.norm_mode)
    anchors = select(model, split.trainable_shared)
    warm = load_config(None, [*PATCH, "train.local_steps=2", *args.overrides])
    train_local(model, volumes, warm.data, warm.train, anchors, cfg.train.proximal_mu, seed=1)

    start = time.perf_counter()
    train_local(model, volumes, cfg.data, cfg.train, anchors, cfg.train.proximal_mu, seed=2)
    fedseg_s = time.perf_counter() - start

    sampler = PatchSampler(cfg.data, cfg.train.batch_size, seed=2)
    rng = np.random.default_rng(2)
    batches = []
    for _ in range(args.steps):
        image, label = volumes[int(rng.integers(len(volumes)))]
        patches = sampler({"image": image, "label": label})
        batches.append((torch.stack([torch.as_tensor(p["image"]) for p in patches]).float(),
                        torch.stack([torch.as_tensor(p["label"]) for p in patches]).long()))
    bare_s = bare_loop(model, batches, cfg)

    fedseg_vps = args.steps * voxels_per_step / fedseg_s
    bare_vps = args.steps * voxels_per_step / bare_s
    print(f"model {cfg.model.arch} channels {cfg.model.channels}, patch {cfg.data.patch_size}, "
          f"batch {cfg.train.batch_size}, {args.steps} steps, {args.threads} threads")
    print(f"fedseg train_local : {fedseg_vps:12,.0f} voxels/s  ({fedseg_s:.2f} s)")
    print(f"bare PyTorch loop  : {bare_vps:12,.0f} voxels/s  ({bare_s:.2f} s)")
    print(f"throughput ratio   : {fedseg_vps / bare_vps:.3f}   (target >= 0.95)")

    unique = {id(p): p for p in model.parameters()}
    fp32_bytes = sum(p.numel() * 4 for p in unique.values())
    for wire in ("float32", "float16"):
        sent = to_wire(select(model, split.travelling), wire).count_bytes()
        print(f"bytes sent per round ({wire:7}, norm_mode {cfg.train.norm_mode}): {sent:,} "
              f"= {sent / fp32_bytes:.3f} x fp32 unique parameters ({fp32_bytes:,})")


if __name__ == "__main__":
    main()
