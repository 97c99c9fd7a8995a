"""Benchmark: local-training throughput and bytes on the wire per site and round.

Prints the throughput (voxels/s) of fedseg's local training loop
(common.training.train_local: patch sampling, augmentation, DiceCE, FedProx)
next to a bare PyTorch loop over the same model and the same patches, in the
same process; and the bytes a site sends per round (fp32 and fp16 on the
wire) next to the fp32 size of the model's unique parameters.

    .venv/bin/python benchmarks/bench_local_training.py [--steps 20] [--threads 2] [--set train.device=cuda]

Targets (issue 2): throughput ratio >= 0.95; bytes ratio <= 1.0 (fp16 <= 0.5).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common.config import load_config
from common.device import CPU_FP32, Compute, compute_for, on_device
from common.model import build_model
from common.params import select, split_parameters
from common.sampling import PatchSampler
from common.training import make_optimizer, seg_loss, train_local
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
    label[0, cx - r : cx + r, cy - r : cy + r, cz - r : cz + r] = 1
    image[label.astype(bool)] += 2.0
    return image, label


def bare_loop(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg, compute: Compute = CPU_FP32
) -> float:
    """Plain PyTorch: forward, DiceCE, backward, step, on the same device and precision; nothing else.

    The batches are on the device before the clock starts: the bare loop pays no sampling or copying.
    """
    with on_device(model, compute.device):
        model.train()
        optimizer = make_optimizer(model, cfg.train)
        scaler = compute.grad_scaler()
        criterion = seg_loss()
        batches = [(compute.to(image), compute.to(label)) for image, label in batches]
        compute.synchronize()
        start = time.perf_counter()
        for image, label in batches:
            optimizer.zero_grad(set_to_none=True)
            with compute.autocast():
                loss = criterion(model(image).float(), label)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        compute.synchronize()
        return time.perf_counter() - start


def fixed_batches(cfg, volumes, steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches drawn and augmented up front, as the bare loop's input."""
    sampler = PatchSampler(cfg.data, cfg.train.batch_size, seed=seed)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        image, label = volumes[int(rng.integers(len(volumes)))]
        patches = sampler({"image": image, "label": label})
        batches.append(
            (
                torch.stack([torch.as_tensor(p["image"]) for p in patches]).float(),
                torch.stack([torch.as_tensor(p["label"]) for p in patches]).long(),
            )
        )
    return batches


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

    bare_s = bare_loop(model, fixed_batches(cfg, volumes, args.steps, seed=2), cfg, compute_for(cfg.train))

    fedseg_vps = args.steps * voxels_per_step / fedseg_s
    bare_vps = args.steps * voxels_per_step / bare_s
    print(
        f"model {cfg.model.arch} channels {cfg.model.channels}, patch {cfg.data.patch_size}, "
        f"batch {cfg.train.batch_size}, {args.steps} steps, {args.threads} threads, "
        f"device {cfg.train.device}, precision {cfg.train.precision}"
    )
    print(f"fedseg train_local : {fedseg_vps:12,.0f} voxels/s  ({fedseg_s:.2f} s)")
    print(f"bare PyTorch loop  : {bare_vps:12,.0f} voxels/s  ({bare_s:.2f} s)")
    print(f"throughput ratio   : {fedseg_vps / bare_vps:.3f}   (target >= 0.95)")

    unique = {id(p): p for p in model.parameters()}
    fp32_bytes = sum(p.numel() * 4 for p in unique.values())
    for wire in ("float32", "float16"):
        sent = to_wire(select(model, split.travelling), wire).count_bytes()
        print(
            f"bytes sent per round ({wire:7}, norm_mode {cfg.train.norm_mode}): {sent:,} "
            f"= {sent / fp32_bytes:.3f} x fp32 unique parameters ({fp32_bytes:,})"
        )


if __name__ == "__main__":
    main()
