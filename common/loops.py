"""Local training (with FedProx) and evaluation, shared by the ClientApp,
baselines and benchmarks, so every path trains and scores in the same way."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from monai import transforms as mt
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from torch import nn

from .config import Augmentation, DataConfig, TrainConfig
from .device import compute_for, on_device
from .fedprox import ProximalGradient
from .prefetch import Prefetcher
from .preprocess import Volume, class_locations

IMAGE, LABEL = "image", "label"
HD_PERCENTILE = 95
ROTATION_RAD = 0.26
"""Augmentation: up to about 15 degrees of rotation per axis (nnU-Net uses up to 30 on 3D data)."""
SCALE_RANGE = 0.15
AFFINE_PROB = 0.2
FLIP_PROB = 0.5
INTENSITY_PROB = 0.15
BRIGHTNESS = 0.25
GAMMA = (0.7, 1.5)
NOISE_STD = 0.1
NOISE_PROB = 0.1
# Scanner augmentation: the intensity changes that separate one scanner from another, at
# probabilities close to nnU-Net's (noise 0.1, blur 0.2, contrast 0.15, low resolution 0.25, gamma 0.3).
BIAS_FIELD_PROB = 0.2
BIAS_COEFF = (0.0, 0.3)
BLUR_PROB = 0.2
BLUR_SIGMA = (0.5, 1.0)
HISTOGRAM_PROB = 0.15
HISTOGRAM_POINTS = (5, 10)
LOW_RES_PROB = 0.25
LOW_RES_ZOOM = (0.5, 1.0)
SCANNER_GAMMA_PROB = 0.3


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean segmentation loss (DiceCE) over the local steps, without the proximal term."""
    proximal_loss: float
    """Mean FedProx penalty over the local steps."""
    steps: int
    lr: float = 0.0
    """The learning rate of this call's first step (it falls over the run with train.lr_schedule: poly)."""


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


def fuse(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Majority vote of annotators [A, X, Y, Z] -> [1, X, Y, Z] (ties go to the lower class)."""
    if labels.shape[0] == 1:
        return np.asarray(labels)
    vote = mt.VoteEnsemble(num_classes=num_classes)
    return np.asarray(vote(torch.from_numpy(np.array(labels)[:, None]))).astype(np.uint8)


def _scanner_shift() -> list[mt.MapTransform]:
    """What differs between scanners: bias field, contrast curve, histogram, blur, resolution, noise.

    A model that has seen these on every site's patches depends less on the
    intensity profile of the scanners it trained with, which is what a site
    with another scanner (or a site that never trained) needs.
    """
    return [
        mt.RandBiasFieldd(keys=IMAGE, coeff_range=BIAS_COEFF, prob=BIAS_FIELD_PROB),
        mt.RandAdjustContrastd(keys=IMAGE, gamma=GAMMA, prob=SCANNER_GAMMA_PROB),
        mt.RandHistogramShiftd(keys=IMAGE, num_control_points=HISTOGRAM_POINTS, prob=HISTOGRAM_PROB),
        mt.RandGaussianSmoothd(keys=IMAGE, sigma_x=BLUR_SIGMA, sigma_y=BLUR_SIGMA, sigma_z=BLUR_SIGMA,
                               prob=BLUR_PROB),
        mt.RandSimulateLowResolutiond(keys=IMAGE, zoom_range=LOW_RES_ZOOM, prob=LOW_RES_PROB),
    ]


def augmentation(seed: int, kind: Augmentation = "standard") -> mt.Compose | None:
    """Spatial and intensity augmentation of a patch (a subset of nnU-Net's); ``scanner`` adds scanner shift."""
    if kind == "none":
        return None
    both = [IMAGE, LABEL]
    augment = mt.Compose([
        mt.RandAffined(keys=both, prob=AFFINE_PROB, rotate_range=(ROTATION_RAD,) * 3,
                       scale_range=(SCALE_RANGE,) * 3, mode=("bilinear", "nearest"), padding_mode="zeros"),
        *(mt.RandFlipd(keys=both, prob=FLIP_PROB, spatial_axis=axis) for axis in range(3)),
        mt.RandScaleIntensityd(keys=IMAGE, factors=BRIGHTNESS, prob=INTENSITY_PROB),
        *(_scanner_shift() if kind == "scanner" else [mt.RandAdjustContrastd(keys=IMAGE, gamma=GAMMA,
                                                                               prob=INTENSITY_PROB)]),
        mt.RandGaussianNoised(keys=IMAGE, std=NOISE_STD, prob=NOISE_PROB),
    ])
    augment.set_random_state(seed)
    return augment


def extract(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """array[:, start:start+size] read from a (memory-mapped) volume, zero-padded outside it."""
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for s, n, dim in zip(start, size, array.shape[1:]):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def as_volume(volume: Volume | tuple[np.ndarray, np.ndarray], num_classes: int) -> Volume:
    """Accept plain (image, label) pairs too; their foreground locations are found here."""
    if isinstance(volume, Volume) and volume.locations is not None:
        return volume
    image, label = volume
    label = np.asarray(label)
    return Volume(image, label, class_locations(label, num_classes, np.random.default_rng(0)))


class PatchSampler:
    """Patches with nnU-Net's foreground oversampling, then augmentation.

    Exactly ``foreground_fraction`` of all patches drawn (error diffusion over
    the stream, not per batch, so the rate holds for any batch size) are
    centred on a voxel of a random foreground class present in the case; the
    others are placed uniformly at random. Patches may reach past the volume
    and are zero-padded there. Cases with several annotators give one label
    per patch: a random annotator (``sample``) or their majority vote (``fuse``).
    """

    def __init__(self, data: DataConfig, batch_size: int, seed: int, num_classes: int = 2,
                 augment: Augmentation = "standard") -> None:
        if len(data.patch_size) != 3:
            raise ValueError("data.patch_size is empty: resolve the plan first (common.plan.Plan.data_config).")
        self.size = tuple(int(v) for v in data.patch_size)
        self.fraction = data.foreground_fraction
        self.fuse = data.annotators == "fuse"
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.rng = np.random.default_rng(seed)
        self.augment = augmentation(seed, augment)
        self.drawn = self.forced = 0

    def _force_foreground(self) -> bool:
        self.drawn += 1
        if math.floor(self.drawn * self.fraction) > self.forced:
            self.forced += 1
            return True
        return False

    def _start(self, shape: Sequence[int], center: np.ndarray | None) -> list[int]:
        start = []
        for axis, (dim, n) in enumerate(zip(shape, self.size)):
            lo, hi = min(0, dim - n), max(0, dim - n)
            if center is None:
                start.append(int(self.rng.integers(lo, hi + 1)))
            else:
                start.append(int(np.clip(center[axis] - n // 2, lo, hi)))
        return start

    def _center(self, volume: Volume) -> np.ndarray | None:
        present = [c for c, where in (volume.locations or {}).items() if len(where)]
        if not present:
            return None
        where = volume.locations[present[int(self.rng.integers(len(present)))]]
        return where[int(self.rng.integers(len(where)))]

    def patch(self, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
        """(image [C, *size] float32, label [1, *size] uint8) from one volume."""
        center = self._center(volume) if self._force_foreground() else None
        start = self._start(volume.image.shape[1:], center)
        # A writable copy: volumes are memory-mapped read-only, which torch warns about in the augmentation.
        image = np.array(extract(volume.image, start, self.size), dtype=np.float32)
        labels = extract(volume.label, start, self.size)
        if self.fuse:
            label = fuse(labels, self.num_classes)
        else:
            pick = int(self.rng.integers(labels.shape[0])) if labels.shape[0] > 1 else 0
            label = labels[pick:pick + 1]
        if self.augment is not None:
            out = self.augment({IMAGE: image, LABEL: label.astype(np.float32)})
            image, label = np.asarray(out[IMAGE]), np.rint(np.asarray(out[LABEL])).astype(np.uint8)
        return image, label

    def __call__(self, sample: dict) -> list[dict]:
        """``batch_size`` patches of one case given as {"image", "label"[, "locations"]}."""
        volume = as_volume(Volume(sample[IMAGE], sample[LABEL], sample.get("locations")), self.num_classes)
        return [dict(zip((IMAGE, LABEL), self.patch(volume))) for _ in range(self.batch_size)]


def _batches(volumes: Sequence[Volume], sampler: PatchSampler, rng: np.random.Generator
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of (image, label) batches; each patch from a random case."""
    while True:
        pairs = [sampler.patch(volumes[int(rng.integers(len(volumes)))]) for _ in range(sampler.batch_size)]
        yield (
            torch.from_numpy(np.stack([p[0] for p in pairs])).float(),
            torch.from_numpy(np.stack([p[1] for p in pairs])).long(),
        )


def _pinned(batches: Iterator[tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches in page-locked memory, so copies to the GPU run asynchronously."""
    for batch in batches:
        yield tuple(t.pin_memory() for t in batch)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def seg_loss() -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True)


def _num_classes(model: nn.Module, default: int = 2) -> int:
    return int(getattr(model, "out_channels", default))


@dataclass(frozen=True)
class RunSteps:
    """Where this call's steps sit in the whole run, for a learning-rate schedule over the run."""

    done: int
    """Optimizer steps this site took in earlier rounds of the run."""
    total: int
    """Optimizer steps this site takes over the whole run (rounds x local_steps)."""


POLY_EXPONENT = 0.9
"""nnU-Net's poly schedule: lr_t = lr * (1 - t / T) ** 0.9."""


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: RunSteps
                 ) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.lr_schedule == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - (steps.done + s) / steps.total) ** POLY_EXPONENT)


def train_local(
    model: nn.Module,
    volumes: Sequence[Volume | tuple[np.ndarray, np.ndarray]],
    data: DataConfig,
    cfg: TrainConfig,
    global_params: dict[str, torch.Tensor],
    mu: float,
    seed: int,
    steps: RunSteps | None = None,
    every: int = 0,
    checkpoint: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` optimizer steps of DiceCE + FedProx on random patches.

    The FedProx gradient is added in closed form after ``backward()``
    (common.fedprox.ProximalGradient), which costs a fifth of building the
    penalty's autograd graph every step. With ``train.lr_schedule: poly`` the
    learning rate decays over the whole run, which ``steps`` locates this call in
    (default: this call is the whole run). Parameters with ``requires_grad``
    off are left as they are (the personalization step trains a subset).
    ``checkpoint(step)`` is called after every ``every`` steps (a learning curve).

    Raises FloatingPointError when the loss stops being finite, so a diverging
    site reports a failure instead of sending NaN weights.
    """
    compute = compute_for(cfg)
    with on_device(model, compute.device):
        model.train()
        num_classes = _num_classes(model)
        volumes = [as_volume(v, num_classes) for v in volumes]
        optimizer = make_optimizer(model, cfg)
        scheduler = lr_scheduler(optimizer, cfg, steps or RunSteps(0, cfg.local_steps))
        criterion = seg_loss()
        sampler = PatchSampler(data, cfg.batch_size, seed, num_classes, cfg.augmentation)
        batches = _batches(volumes, sampler, np.random.default_rng(seed))
        scaler = compute.grad_scaler()
        proximal = ProximalGradient(model, {k: compute.to(v) for k, v in global_params.items()}, mu)
        ahead = cfg.prefetch_batches if compute.device.type == "cuda" else 0
        first_lr = float(optimizer.param_groups[0]["lr"])
        with Prefetcher(_pinned(batches), ahead) if ahead else nullcontext(batches) as batches:
            seg_total, prox_total = 0.0, 0.0
            for step in range(cfg.local_steps):
                image, label = (compute.to(t) for t in next(batches))
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
                if scheduler is not None:
                    scheduler.step()
                if checkpoint is not None and every and (step + 1) % every == 0:
                    checkpoint(step + 1)
                seg_total += seg_value
                prox_total += prox
    return TrainResult(seg_total / cfg.local_steps, prox_total / cfg.local_steps, cfg.local_steps, first_lr)


def _mean_foreground_dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    return float(metric(pred, truth).mean())


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
                logits = sliding_window_inference(
                    x, roi_size=data.patch_size, sw_batch_size=cfg.sw_batch_size, predictor=model,
                    overlap=cfg.sw_overlap,
                ).float().cpu()
            losses.append(float(criterion(logits, y)))
            pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
            truth = one_hot(y, num_classes)
            dice_metric(pred, truth)
            if labels.shape[0] > 1:
                per_annotator.append([
                    _mean_foreground_dice(pred, one_hot(torch.from_numpy(np.array(a[None, None], dtype=np.int64)),
                                                        num_classes))
                    for a in labels
                ])
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
        dice_per_annotator=[float(v) for v in np.mean(per_annotator, axis=0)] if per_annotator else None,
    )
