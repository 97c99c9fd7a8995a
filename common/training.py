"""Local training: DiceCE plus the FedProx gradient on sampled patches, shared by the ClientApp,
personalization, the comparison's baselines and the benchmarks, so every path trains in the same way.

Adam at a constant learning rate, the only optimizer and schedule measured to
help here: nnU-Net's poly decay gave 0.584 / 0.608 validation Dice (federated /
personalized) against 0.741 / 0.760 with a constant rate (docs/results.md), and
in a deployment it decayed over a run length the site could not know; SGD was
never run. Both were removed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from .config import DataConfig, TrainConfig
from .device import compute_for, on_device
from .fedprox import ProximalGradient
from .prefetch import Prefetcher
from .preprocess import Volume
from .sampling import PatchSampler, as_volume


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean segmentation loss (DiceCE) over the local steps, without the proximal term."""
    proximal_loss: float
    """Mean FedProx penalty over the local steps."""
    steps: int
    lr: float = 0.0
    """The learning rate the steps were taken with."""


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the parameters that train (``requires_grad``: personalization trains a subset)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def seg_loss() -> nn.Module:
    """The segmentation loss, which evaluation reports too: Dice plus cross-entropy over softmax outputs."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def _num_classes(model: nn.Module, default: int = 2) -> int:
    return int(getattr(model, "out_channels", default))


def _pinned(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches in page-locked memory, so copies to the GPU run asynchronously."""
    for image, label in batches:
        yield image.pin_memory(), label.pin_memory()


def train_local(
    model: nn.Module,
    volumes: Sequence[Volume | tuple[np.ndarray, np.ndarray]],
    data: DataConfig,
    cfg: TrainConfig,
    global_params: dict[str, torch.Tensor],
    mu: float,
    seed: int,
    every: int = 0,
    checkpoint: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` optimizer steps of DiceCE + FedProx on random patches.

    The FedProx gradient is added in closed form after ``backward()``
    (common.fedprox.ProximalGradient), which costs a fifth of building the
    penalty's autograd graph every step. Parameters with ``requires_grad``
    off are left as they are (the personalization step trains a subset).
    ``checkpoint(step)`` is called after every ``every`` steps (a learning curve).

    Raises FloatingPointError when the loss stops being finite, so a diverging
    site reports a failure instead of sending NaN weights.
    """
    compute = compute_for(cfg)
    with on_device(model, compute.device):
        model.train()
        num_classes = _num_classes(model)
        cases = [as_volume(v, num_classes) for v in volumes]
        optimizer = make_optimizer(model, cfg)
        criterion = seg_loss()
        sampler = PatchSampler(data, cfg.batch_size, seed, num_classes, cfg.augmentation)
        batches = sampler.batches(cases, np.random.default_rng(seed))
        scaler = compute.grad_scaler()
        proximal = ProximalGradient(model, {k: compute.to(v) for k, v in global_params.items()}, mu)
        ahead = cfg.prefetch_batches if compute.device.type == "cuda" else 0
        with Prefetcher(_pinned(batches), ahead) if ahead else nullcontext(batches) as stream:
            seg_total, prox_total = 0.0, 0.0
            for step in range(cfg.local_steps):
                image, label = (compute.to(t) for t in next(stream))
                optimizer.zero_grad(set_to_none=True)
                with compute.autocast():
                    seg = criterion(model(image).float(), label)
                scaler.scale(seg).backward()
                scaler.unscale_(optimizer)  # fp16: the proximal gradient is added to the true, unscaled gradients
                prox = proximal.apply()  # adds mu * (w - w^t) to the shared gradients
                seg_value = seg.item()
                if not (math.isfinite(seg_value) and math.isfinite(prox)):
                    raise FloatingPointError(f"training loss became non-finite at local step {step + 1}")
                scaler.step(optimizer)
                scaler.update()
                if checkpoint is not None and every and (step + 1) % every == 0:
                    checkpoint(step + 1)
                seg_total += seg_value
                prox_total += prox
    return TrainResult(seg_total / cfg.local_steps, prox_total / cfg.local_steps, cfg.local_steps, cfg.lr)
