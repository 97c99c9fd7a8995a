"""Scoring a model on whole volumes: sliding-window prediction, per-class Dice, HD95 and the loss.

Shared by the ClientApp, the cross-site evaluation, personalization and the
comparison's baselines, so every path scores in the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from torch import nn

from .config import DataConfig, TrainConfig
from .device import compute_for, on_device
from .preprocess import Volume
from .sampling import fuse
from .training import seg_loss

HD_PERCENTILE = 95


@dataclass(frozen=True)
class EvalResult:
    dice: float
    """Mean foreground Dice over cases and classes (against the annotators' fusion when several)."""
    dice_per_class: list[float]
    hd95: float | None
    """Mean 95th percentile Hausdorff distance in mm (an empty prediction scores the
    volume diagonal, the worst possible); None when disabled."""
    loss: float
    num_cases: int
    dice_per_annotator: list[float] | None = None
    """With several label files per case: mean foreground Dice against each annotator."""


def _mean_foreground_dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    return float(metric(pred, truth).mean())  # type: ignore[union-attr]  # MONAI: a tensor for tensor inputs


@torch.no_grad()
def evaluate(
    model: nn.Module,
    volumes: Sequence[Volume | tuple[np.ndarray, np.ndarray]],
    data: DataConfig,
    cfg: TrainConfig,
    num_classes: int,
) -> EvalResult:
    """Sliding-window prediction of whole volumes, scored with per-class Dice and HD95.

    With several annotators per case the headline Dice and loss are against
    their majority vote, and Dice against each annotator is reported as well.
    """
    compute = compute_for(cfg)
    with on_device(model, compute.device):
        model.eval()
        criterion = seg_loss()
        dice_metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
        hd_metric = HausdorffDistanceMetric(include_background=False, percentile=HD_PERCENTILE, reduction="none")
        losses, hds, per_annotator = [], [], []
        for image, labels in volumes:
            labels = np.asarray(labels)
            x = compute.to(torch.from_numpy(np.array(image, dtype=np.float32))[None])
            y = torch.tensor(fuse(labels, num_classes))[None].long()
            with compute.autocast():
                logits = (
                    sliding_window_inference(  # type: ignore[union-attr]  # MONAI: a tensor model gives a tensor
                        x,
                        roi_size=data.patch_size,
                        sw_batch_size=cfg.sw_batch_size,
                        predictor=model,
                        overlap=cfg.sw_overlap,
                    )
                    .float()
                    .cpu()
                )
            losses.append(float(criterion(logits, y)))
            pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
            truth = one_hot(y, num_classes)
            dice_metric(pred, truth)
            if labels.shape[0] > 1:
                per_annotator.append(
                    [
                        _mean_foreground_dice(
                            pred, one_hot(torch.from_numpy(np.array(a[None, None], dtype=np.int64)), num_classes)
                        )
                        for a in labels
                    ]
                )
            if cfg.hd95:
                hd = hd_metric(pred, truth, spacing=list(data.spacing))
                diagonal = math.dist([0, 0, 0], [s * d for s, d in zip(image.shape[1:], data.spacing, strict=True)])
                # MONAI types a metric's result for any input kind; tensors in give a tensor out
                hds.append(torch.nan_to_num(hd, nan=diagonal, posinf=diagonal).mean().item())  # type: ignore[arg-type]
    per_class = [float(v) for v in dice_metric.aggregate()]
    return EvalResult(
        dice=float(np.mean(per_class)),
        dice_per_class=per_class,
        hd95=float(np.mean(hds)) if cfg.hd95 else None,
        loss=float(np.mean(losses)),
        num_cases=len(volumes),
        dice_per_annotator=[float(v) for v in np.mean(per_annotator, axis=0)] if per_annotator else None,
    )
