"""Turn a case on disk into normalized arrays on the plan's grid, cached on disk per plan.

The steps follow nnU-Net, built from MONAI transforms: load with nibabel,
channel first, reorient to RAS, crop to the nonzero box, resample to the
plan's spacing in voxel space (image trilinear, labels nearest), normalize each
channel by the plan's scheme. Resampling uses ``Resize`` (torch interpolate)
rather than ``Spacing`` (grid_sample), because the latter builds a coordinate
grid three times the size of the output, which does not fit a 512x512x400 CT
in a 2-core site's memory.

The cache holds, per case, ``image.npy`` [C, X, Y, Z] float32, ``label.npy``
[A, X, Y, Z] uint8 (one channel per annotator) and ``locations.npz`` (a sample
of voxel coordinates per foreground class, for the patch sampler), under
``<state_dir>/cache/plan-<version>/<case>/``. Arrays are memory-mapped when
read, so a site trains on huge volumes with only its patches in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from .dataset import Case
from .plan import ChannelNorm, Plan

log = logging.getLogger(__name__)

IMAGE, LABEL = "image", "label"
LOCATIONS_PER_CLASS = 10_000
"""Foreground voxel coordinates kept per class for oversampling (nnU-Net keeps 10,000)."""
META_FILE = "meta.json"
RAS = "RAS"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class Volume(tuple):
    """A preprocessed case: unpacks as ``(image, label)`` like a pair.

    ``image`` is [C, X, Y, Z] float32 and ``label`` [A, X, Y, Z] uint8 with one
    channel per annotator (the first is the reference). ``locations`` maps a
    foreground class to sampled voxel coordinates [N, 3]; None means "find
    them when needed".
    """

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


@dataclass(frozen=True)
class Geometry:
    """Where the plan-space array sits in the original file, to map a prediction back."""

    affine: np.ndarray
    """The input file's affine (written unchanged to the output)."""
    shape: tuple[int, int, int]
    """The input file's spatial shape."""
    ras_shape: tuple[int, int, int]
    box: tuple[tuple[int, int], ...]
    """The nonzero crop in RAS voxel coordinates (start, stop) per axis."""


def class_locations(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """A sample of voxel coordinates per foreground class, over all annotators."""
    out = {}
    for c in range(1, num_classes):
        coords = np.argwhere(np.any(label == c, axis=0))
        if len(coords) > LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), LOCATIONS_PER_CLASS, replace=False)]
        out[c] = coords.astype(np.int32)
    return out


def _resample(tensor: MetaTensor, spacing: tuple[float, ...], mode: str) -> MetaTensor:
    """Resample to ``spacing`` in voxel space (nnU-Net's way), keeping the metadata's affine right."""
    pixdim = np.asarray(tensor.pixdim, dtype=float)[:3]
    size = [max(1, round(s * p / t)) for s, p, t in zip(tensor.shape[1:], pixdim, spacing)]
    if list(size) == list(tensor.shape[1:]):
        return tensor
    return mt.Resize(spatial_size=size, mode=mode, anti_aliasing=False)(tensor)


def _ct_normalize_(channel: torch.Tensor, norm: ChannelNorm) -> None:
    """MONAI's ScaleIntensityRange(clip=True) from the clip range to its z-scores: the same operations in
    the same order (so the same numbers), done in place, as a CT volume is too large for its temporaries."""
    b_min, b_max = (norm.clip_low - norm.mean) / norm.std, (norm.clip_high - norm.mean) / norm.std
    channel.sub_(norm.clip_low).div_(norm.clip_high - norm.clip_low).mul_(b_max - b_min).add_(b_min)
    channel.clamp_(b_min, b_max)


def normalize(image: torch.Tensor, norms: tuple[ChannelNorm, ...]) -> torch.Tensor:
    """Normalize each channel in place as the plan says (see ChannelNorm)."""
    if image.shape[0] != len(norms):
        raise ValueError(f"the image has {image.shape[0]} channels, the plan normalizes {len(norms)}.")
    plain = image.as_tensor() if isinstance(image, MetaTensor) else image
    for c, norm in enumerate(norms):
        if norm.scheme == "ct" and norm.clip_high > norm.clip_low:
            _ct_normalize_(plain[c], norm)
        else:
            image[c:c + 1] = mt.NormalizeIntensity()(image[c:c + 1])
    return image


def _load_3d_file(path: Path, file_layout: bool) -> MetaTensor:
    """One 3D NIfTI file as MONAI's LoadImage gives it (float32, channel first, same metadata), faster.

    nibabel hands the voxels over in the file's (Fortran) order. LoadImage reorders
    them in numpy, which for a 512x512x400 CT takes several times longer than reading
    the file; ``file_layout`` keeps that order (same values, transposed strides),
    otherwise torch reorders in one pass.
    """
    img = nib.load(str(path))
    voxels = torch.from_numpy(np.asanyarray(img.dataobj))
    if file_layout:
        data = voxels.to(torch.float32)[None]
    else:
        data = torch.empty((1, *voxels.shape), dtype=torch.float32)
        data[0].copy_(voxels)
    affine = torch.as_tensor(img.affine, dtype=torch.float64)
    meta = {"original_affine": np.asarray(img.affine), "filename_or_obj": str(path), "space": RAS}
    return MetaTensor(data, affine=affine, meta=meta)


def load_image(paths: tuple[Path, ...], file_layout: bool = False) -> MetaTensor:
    """Channel-first image in its stored orientation: one 3D file per channel, or one 4D file.

    ``file_layout``: see _load_3d_file; only where no reduction over the whole volume
    depends on the memory order (its float rounding would), i.e. not for training caches.
    """
    if len(paths) == 1 and len(nib.load(str(paths[0])).shape) == 3:
        return _load_3d_file(paths[0], file_layout)
    loader = mt.LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)
    files = [str(p) for p in paths]
    return loader(files if len(files) > 1 else files[0])


def _crop_box(image: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The box holding every nonzero voxel: two passes over the mask, the first along its contiguous axis."""
    mask = image[0] != 0 if image.shape[0] == 1 else torch.any(image != 0, dim=0)
    fast = int(np.argmin(mask.stride()))
    first, second = (a for a in range(3) if a != fast)
    plane = mask.any(dim=fast)
    hits = {fast: mask.any(dim=(first, second)), first: plane.any(dim=1), second: plane.any(dim=0)}
    if not bool(hits[0].any()):
        return tuple((0, s) for s in mask.shape)
    box = []
    for axis in range(3):
        where = torch.nonzero(hits[axis]).flatten()
        box.append((int(where[0]), int(where[-1]) + 1))
    return tuple(box)


def _crop(tensor: MetaTensor, box: tuple[tuple[int, int], ...]) -> MetaTensor:
    return mt.SpatialCrop(roi_start=[b[0] for b in box], roi_end=[b[1] for b in box])(tensor)


def prepare_image(paths: tuple[Path, ...], plan: Plan, file_layout: bool = False) -> tuple[MetaTensor, Geometry]:
    """Image in plan space plus the geometry needed to map results back to the file's grid.

    ``file_layout`` (prediction): keep the file's memory order, see load_image.
    """
    image = load_image(paths, file_layout)
    affine = np.asarray(image.meta["original_affine"], dtype=float)
    shape = tuple(int(s) for s in image.shape[1:])
    image = mt.Orientation(axcodes=RAS, labels=RAS_LABELS)(image)
    box = _crop_box(image)
    image = _resample(_crop(image, box), plan.target_spacing, "trilinear")
    image = normalize(image, plan.normalization)
    return image, Geometry(affine, shape, _ras_shape(shape, affine), box)


def _ras_shape(shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
    ornt = nib.orientations.io_orientation(affine)
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = shape[axis]
    return tuple(out)


def prepare_case(case: Case, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(image [C, X, Y, Z] float32, labels [A, X, Y, Z] uint8) of a training case in plan space."""
    image, geometry = prepare_image(case.images, plan)
    labels = []
    label_loader = mt.LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.uint8)
    for path in case.labels:
        label = mt.Orientation(axcodes=RAS, labels=RAS_LABELS)(label_loader(str(path)))
        label = _resample(_crop(label, geometry.box), plan.target_spacing, "nearest-exact")
        labels.append(np.rint(label.numpy()).astype(np.uint8))
    return image.numpy().astype(np.float32, copy=False), np.concatenate(labels)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class PreprocessedCases:
    """Preprocessed arrays of a site's cases, computed once per plan version and kept on disk."""

    def __init__(self, cache_root: Path, plan: Plan, num_classes: int) -> None:
        self.plan = plan
        self.num_classes = num_classes
        self.cache_dir = Path(cache_root) / f"plan-{plan.version}"

    def _build(self, case: Case, folder: Path) -> None:
        image, labels = prepare_case(case, self.plan)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        _atomic_npy(folder / "image.npy", image)
        _atomic_npy(folder / "label.npy", labels)
        rng = np.random.default_rng(len(case.case_id))
        locations = class_locations(labels, self.num_classes, rng)
        np.savez(folder / "locations.npz", **{str(c): v for c, v in locations.items()})
        (folder / META_FILE).write_text(json.dumps({"plan": self.plan.version, "shape": list(image.shape)}))

    def load(self, case: Case) -> Volume:
        """The case in plan space (memory-mapped), preprocessing it first if not cached."""
        folder = self.cache_dir / case.case_id
        if not (folder / META_FILE).is_file():
            log.info("preprocessing case into %s", folder)
            self._build(case, folder)
        with np.load(folder / "locations.npz") as stored:
            locations = {int(c): stored[c] for c in stored.files}
        return Volume(
            np.load(folder / "image.npy", mmap_mode="r"),
            np.load(folder / "label.npy", mmap_mode="r"),
            locations,
        )
