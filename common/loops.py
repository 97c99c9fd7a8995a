"""Local training (with FedProx) and evaluation, shared by the ClientApp,
baselines and benchmarks, so every path trains and scores in the same way."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from torch import nn

from .config import DataConfig, TrainConfig
from .fedprox import proximal_term

IMAGE, LABEL = "image", "label"
HD_PERCENTILE = 95
Volume = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean segmentation loss (DiceCE) over the local steps, without the proximal term."""
    proximal_loss: float
    """Mean FedProx penalty over the local steps."""
    steps: int


@dataclass(frozen=True)
class EvalResult:
    dice: float
    """Mean foreground Dice over cases and classes."""
    dice_per_class: list[float]
    hd95: float | None
    """Mean 95th percentile Hausdorff distance in mm (an empty prediction scores the
    volume diagonal, the worst possible); None when disabled."""
    loss: float
    num_cases: int


def patch_sampler(data: DataConfig, batch_size: int, seed: int) -> mt.Compose:
    """Class-balanced random patches with moderate augmentation.

    ``foreground_fraction`` of the patches are centred on a foreground voxel, so a
    structure occupying a fraction of a percent of the volume is still seen
    every step; the rest are centred on background.
    """
    fg = data.foreground_fraction
    sampler = mt.Compose(
        [
            mt.SpatialPadd(keys=[IMAGE, LABEL], spatial_size=data.patch_size),
            mt.RandCropByPosNegLabeld(
                keys=[IMAGE, LABEL], label_key=LABEL, spatial_size=data.patch_size,
                pos=fg, neg=1.0 - fg, num_samples=batch_size,
            ),
            mt.RandFlipd(keys=[IMAGE, LABEL], prob=0.5, spatial_axis=0),
            mt.RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.3),
            mt.RandGaussianNoised(keys=IMAGE, std=0.05, prob=0.2),
        ]
    )
    sampler.set_random_state(seed)
    return sampler


def _batches(volumes: Sequence[Volume], sampler: mt.Compose, rng: np.random.Generator):
    """Endless stream of (image, label) batches, one random case per batch."""
    while True:
        image, label = volumes[int(rng.integers(len(volumes)))]
        patches = sampler({IMAGE: image, LABEL: label})
        yield (
            torch.stack([torch.as_tensor(p[IMAGE]) for p in patches]).float(),
            torch.stack([torch.as_tensor(p[LABEL]) for p in patches]).long(),
        )


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def seg_loss() -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True)


def train_local(
    model: nn.Module,
    volumes: Sequence[Volume],
    data: DataConfig,
    cfg: TrainConfig,
    global_params: dict[str, torch.Tensor],
    mu: float,
    seed: int,
) -> TrainResult:
    """Run ``cfg.local_steps`` optimizer steps of DiceCE + FedProx on random patches.

    Raises FloatingPointError when the loss stops being finite, so a diverging
    site reports a failure instead of sending NaN weights.
    """
    model.train()
    optimizer = make_optimizer(model, cfg)
    criterion = seg_loss()
    batches = _batches(volumes, patch_sampler(data, cfg.batch_size, seed), np.random.default_rng(seed))
    anchors = {k: v.detach() for k, v in global_params.items()}
    seg_total, prox_total = 0.0, 0.0
    for step in range(cfg.local_steps):
        image, label = next(batches)
        optimizer.zero_grad(set_to_none=True)
        seg = criterion(model(image), label)
        prox = proximal_term(model, anchors, mu)
        loss = seg + prox
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became non-finite at local step {step + 1}")
        loss.backward()
        optimizer.step()
        seg_total += seg.item()
        prox_total += prox.detach().item()
    return TrainResult(seg_total / cfg.local_steps, prox_total / cfg.local_steps, cfg.local_steps)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    volumes: Sequence[Volume],
    data: DataConfig,
    cfg: TrainConfig,
    num_classes: int,
) -> EvalResult:
    """Sliding-window prediction of whole volumes, scored with per-class Dice and HD95."""
    model.eval()
    criterion = seg_loss()
    dice_metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=False, percentile=HD_PERCENTILE, reduction="none")
    losses, hds = [], []
    for image, label in volumes:
        x = torch.as_tensor(image)[None].float()
        y = torch.as_tensor(label)[None].long()
        logits = sliding_window_inference(
            x, roi_size=data.patch_size, sw_batch_size=1, predictor=model, overlap=cfg.sw_overlap
        )
        losses.append(float(criterion(logits, y)))
        pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
        truth = one_hot(y, num_classes)
        dice_metric(pred, truth)
        if cfg.hd95:
            hd = hd_metric(pred, truth, spacing=list(data.spacing))
            diagonal = math.dist([0, 0, 0], [s * d for s, d in zip(image.shape[1:], data.spacing)])
            hds.append(torch.nan_to_num(hd, nan=diagonal, posinf=diagonal).mean().item())
    per_class = [float(v) for v in dice_metric.aggregate()]
    return EvalResult(
        dice=float(np.mean(per_class)),
        dice_per_class=per_class,
        hd95=float(np.mean(hds)) if cfg.hd95 else None,
        loss=float(np.mean(losses)),
        num_cases=len(volumes),
    )
