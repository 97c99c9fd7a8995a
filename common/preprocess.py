"""Turn a case on disk into normalized arrays on the plan's grid, cached on disk per plan.

The steps follow nnU-Net: common.reading's MONAI pipeline (load, channel
first, RAS, crop to the nonzero box, resample to the plan's spacing, the
interpolation chosen by key), then each channel normalized by the plan's
scheme.

The cache holds, per case, ``image.npy`` [C, X, Y, Z] float32, ``label.npy``
[A, X, Y, Z] uint8 (one channel per annotator) and ``locations.npz`` (a sample
of voxel coordinates per foreground class, for the patch sampler), under
``<state_dir>/cache/plan-<version>/<case>/``. Arrays are memory-mapped when
read, so a site trains on huge volumes with only its patches in memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.transforms.utils import map_classes_to_indices

from .dataset import Case
from .files import atomic_folder
from .plan import ChannelNorm, Plan
from .reading import IMAGE, case_dict, label_keys, plan_space
from .runs import CACHE_IMAGE, CACHE_LABEL, CACHE_LOCATIONS, CACHE_META, CACHE_PLAN_DIR

log = logging.getLogger("fedseg.common")
_Image = TypeVar("_Image", bound=torch.Tensor)

LOCATIONS_PER_CLASS = 10_000
"""Foreground voxel coordinates kept per class for oversampling (nnU-Net keeps 10,000)."""


class Volume(tuple):
    """A preprocessed case: unpacks as ``(image, label)`` like a pair.

    ``image`` is [C, X, Y, Z] float32 and ``label`` [A, X, Y, Z] uint8 with one
    channel per annotator (the first is the reference). ``locations`` maps a
    foreground class to sampled voxel coordinates [N, 3]; None means "find
    them when needed".
    """

    locations: dict[int, np.ndarray] | None

    def __new__(cls, image: np.ndarray, label: np.ndarray, locations: dict[int, np.ndarray] | None = None) -> Volume:
        obj = super().__new__(cls, (image, label))
        obj.locations = locations
        return obj

    @property
    def image(self) -> np.ndarray:
        return self[0]

    @property
    def label(self) -> np.ndarray:
        return self[1]


def class_locations(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """A sample of voxel coordinates per foreground class, over all annotators (MONAI's map_classes_to_indices).

    Each class goes in as a one-hot pair ("class c by any annotator" and an empty
    background, so that MONAI does not list every background voxel): two masks in
    memory whatever the number of classes.
    """
    out = {}
    for c in range(1, num_classes):
        onehot = np.zeros((2, *label.shape[1:]), dtype=bool)
        np.any(label == c, axis=0, out=onehot[1])
        flat = np.asarray(map_classes_to_indices(onehot)[1])
        coords = np.stack(np.unravel_index(flat, onehot.shape[1:]), axis=-1)
        if len(coords) > LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), LOCATIONS_PER_CLASS, replace=False)]
        out[c] = coords.astype(np.int32)
    return out


def _ct_normalize_(channel: torch.Tensor, clip_low: float, clip_high: float, mean: float, std: float) -> None:
    """MONAI's ScaleIntensityRange(clip=True) from the clip range to its z-scores: the same operations in
    the same order (so the same numbers), done in place, as a CT volume is too large for its temporaries."""
    b_min, b_max = (clip_low - mean) / std, (clip_high - mean) / std
    channel.sub_(clip_low).div_(clip_high - clip_low).mul_(b_max - b_min).add_(b_min)
    channel.clamp_(b_min, b_max)


def normalize(image: _Image, norms: tuple[ChannelNorm, ...]) -> _Image:
    """Normalize each channel in place as the plan says (see ChannelNorm)."""
    if image.shape[0] != len(norms):
        raise ValueError(f"the image has {image.shape[0]} channels, the plan normalizes {len(norms)}.")
    plain = image.as_tensor() if isinstance(image, MetaTensor) else image
    for c, norm in enumerate(norms):
        if norm.scheme == "ct":
            low, high, mean, std = norm.ct_values()
            if high > low:
                _ct_normalize_(plain[c], low, high, mean, std)
                continue
        # MONAI types its output for any input kind; a tensor in gives a tensor out
        image[c : c + 1] = mt.NormalizeIntensity()(image[c : c + 1])  # type: ignore[assignment]
    return image


def prepare_image(paths: tuple[Path, ...], plan: Plan, file_layout: bool = False) -> MetaTensor:
    """Image in plan space, normalized; its recorded steps map results back to the file (reading.to_file_grid).

    ``file_layout`` (prediction): keep the file's memory order, see reading.load_image.
    """
    image = plan_space([IMAGE], plan.target_spacing, file_layout)({IMAGE: paths})[IMAGE]
    return normalize(image, plan.normalization)


def prepare_case(case: Case, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(image [C, X, Y, Z] float32, labels [A, X, Y, Z] uint8) of a training case in plan space."""
    keys = (IMAGE, *label_keys(case))
    data = plan_space(keys, plan.target_spacing)(case_dict(case))
    image = normalize(data[IMAGE], plan.normalization)
    labels = [np.rint(data[key].numpy()).astype(np.uint8) for key in keys[1:]]
    return image.numpy().astype(np.float32, copy=False), np.concatenate(labels)


class PreprocessedCases:
    """Preprocessed arrays of a site's cases, computed once per plan version and kept on disk."""

    def __init__(self, cache_root: Path, plan: Plan, num_classes: int, remap: np.ndarray | None = None) -> None:
        self.plan = plan
        self.num_classes = num_classes
        self.remap = remap
        """Site label value -> the federation's (common/labels.py), or None when they are the same."""
        self.cache_dir = Path(cache_root) / CACHE_PLAN_DIR.format(plan.version)

    def _build(self, case: Case, folder: Path) -> None:
        image, labels = prepare_case(case, self.plan)
        if self.remap is not None:  # the plan's version covers the coding, so a remapped cache is its own
            labels = self.remap[np.rint(labels).astype(np.int64).clip(0, len(self.remap) - 1)].astype(labels.dtype)

        def fill(building: Path) -> None:
            np.save(building / CACHE_IMAGE, image)
            np.save(building / CACHE_LABEL, labels)
            locations = class_locations(labels, self.num_classes, np.random.default_rng(len(case.case_id)))
            # numpy's stub cannot tell these names from savez's allow_pickle keyword
            np.savez(building / CACHE_LOCATIONS, **{str(c): v for c, v in locations.items()})  # type: ignore[arg-type]
            (building / CACHE_META).write_text(json.dumps({"plan": self.plan.version, "shape": list(image.shape)}))

        # Renamed into place whole: a site answering two runs at once may build one case twice.
        atomic_folder(folder, fill, complete=CACHE_META)

    def load(self, case: Case) -> Volume:
        """The case in plan space (memory-mapped), preprocessing it first if not cached."""
        folder = self.cache_dir / case.case_id
        if not (folder / CACHE_META).is_file():
            log.info("preprocessing case into %s", folder)
            self._build(case, folder)
        with np.load(folder / CACHE_LOCATIONS) as stored:
            locations = {int(c): stored[c] for c in stored.files}
        return Volume(
            np.load(folder / CACHE_IMAGE, mmap_mode="r"),
            np.load(folder / CACHE_LABEL, mmap_mode="r"),
            locations,
        )
