"""Training patches: nnU-Net's foreground oversampling over (memory-mapped) volumes, then augmentation.

Also the majority vote of several annotators (``fuse``), which both the
sampler (``data.annotators: fuse``) and the evaluation score against.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from monai import transforms as mt

from .augmentation import augmentation
from .config import Augmentation, DataConfig
from .preprocess import Volume, class_locations
from .reading import IMAGE, LABEL


def fuse(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Majority vote of annotators [A, X, Y, Z] -> [1, X, Y, Z] (ties go to the lower class)."""
    if labels.shape[0] == 1:
        return np.asarray(labels)
    vote = mt.VoteEnsemble(num_classes=num_classes)
    return np.asarray(vote(torch.from_numpy(np.array(labels)[:, None]))).astype(np.uint8)


def extract(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """array[:, start:start+size] read from a (memory-mapped) volume, zero-padded outside it."""
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for s, n, dim in zip(start, size, array.shape[1:], strict=True):
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

    def __init__(
        self, data: DataConfig, batch_size: int, seed: int, num_classes: int = 2, augment: Augmentation = "standard"
    ) -> None:
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
        for axis, (dim, n) in enumerate(zip(shape, self.size, strict=True)):
            lo, hi = min(0, dim - n), max(0, dim - n)
            if center is None:
                start.append(int(self.rng.integers(lo, hi + 1)))
            else:
                start.append(int(np.clip(center[axis] - n // 2, lo, hi)))
        return start

    def _center(self, volume: Volume) -> np.ndarray | None:
        locations = volume.locations or {}
        present = [c for c, where in locations.items() if len(where)]
        if not present:
            return None
        where = locations[present[int(self.rng.integers(len(present)))]]
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
            label = labels[pick : pick + 1]
        if self.augment is not None:
            out = self.augment({IMAGE: image, LABEL: label.astype(np.float32)})
            image, label = np.asarray(out[IMAGE]), np.rint(np.asarray(out[LABEL])).astype(np.uint8)
        return image, label

    def __call__(self, sample: dict) -> list[dict]:
        """``batch_size`` patches of one case given as {"image", "label"[, "locations"]}."""
        volume = as_volume(Volume(sample[IMAGE], sample[LABEL], sample.get("locations")), self.num_classes)
        return [dict(zip((IMAGE, LABEL), self.patch(volume), strict=True)) for _ in range(self.batch_size)]

    def batches(
        self, volumes: Sequence[Volume], rng: np.random.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless stream of (image, label) batches; each patch from a random case."""
        while True:
            pairs = [self.patch(volumes[int(rng.integers(len(volumes)))]) for _ in range(self.batch_size)]
            yield (
                torch.from_numpy(np.stack([p[0] for p in pairs])).float(),
                torch.from_numpy(np.stack([p[1] for p in pairs])).long(),
            )
