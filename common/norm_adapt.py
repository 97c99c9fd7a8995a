"""Adapting the normalization layers to a site that never trained, from its unlabeled scans.

A hospital that joins after training has no site-local norm tensors: with
``norm_mode: local`` the global model reaches it with the initial norm weights,
which no site trained with. Its labels are not needed to do better:

1. BatchNorm running statistics are re-estimated on the site's own patches
   (AdaBN, Li et al. 2016). Instance norm has no statistics to re-estimate: it
   normalises every patch by itself.
2. The affine weights of every normalization layer are fitted by minimising the
   entropy of the model's predictions on those patches (Tent, Wang et al. 2021),
   with every other weight frozen.

Everything happens at the site; only the resulting Dice leaves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt
from torch import nn

from .config import DataConfig
from .params import NORM_TYPES

IMAGE = "image"


@dataclass(frozen=True)
class AdaptResult:
    entropy_before: float
    """Mean voxel entropy (nats) of the predictions on the first batch, before adaptation."""
    entropy_after: float
    """Mean voxel entropy over the last adaptation step."""
    steps: int


def _image_patches(images: Sequence[np.ndarray], data: DataConfig, batch_size: int, seed: int):
    """Endless stream of batches of random image patches; no label is read."""
    sampler = mt.Compose([
        mt.SpatialPadd(keys=IMAGE, spatial_size=data.patch_size),
        mt.RandSpatialCropSamplesd(keys=IMAGE, roi_size=data.patch_size, num_samples=batch_size, random_size=False),
    ])
    sampler.set_random_state(seed)
    rng = np.random.default_rng(seed)
    while True:
        patches = sampler({IMAGE: images[int(rng.integers(len(images)))]})
        yield torch.stack([torch.as_tensor(p[IMAGE]) for p in patches]).float()


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def _reestimate_statistics(model: nn.Module, batches, steps: int) -> None:
    """AdaBN: cumulative mean of the site's batch statistics (momentum None)."""
    norms = _batch_norms(model)
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(steps):
        model(next(batches))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def adapt_norm(
    model: nn.Module,
    images: Sequence[np.ndarray],
    data: DataConfig,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> AdaptResult:
    """Adapt ``model``'s normalization layers in place to ``images`` (channel-first arrays)."""
    if steps < 1 or not images:
        raise ValueError(f"norm adaptation needs >= 1 step and >= 1 image, got {steps} steps, {len(images)} images")
    batches = _image_patches(images, data, batch_size, seed)
    _reestimate_statistics(model, batches, steps)
    affine = [p for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)]
    model.eval()  # BatchNorm keeps the statistics just estimated; instance norm is unaffected
    with torch.no_grad():
        before = float(_entropy(model(next(batches))))
    after = before
    if affine:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in affine:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(affine, lr=lr)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = _entropy(model(next(batches)))
            loss.backward()
            optimizer.step()
            after = float(loss.detach())
        for p in model.parameters():
            p.requires_grad_(True)
    model.eval()
    return AdaptResult(entropy_before=before, entropy_after=after, steps=steps)
