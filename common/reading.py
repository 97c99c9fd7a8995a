"""Reading a case: one MONAI dictionary pipeline, shared by check, fingerprint, preprocess and predict.

A case is a dictionary: ``image`` (one file per channel, or one 4D file) and
one key per annotator's label map (``label``, ``label_1``, ...). Every step is
a MONAI dictionary transform on MetaTensors, and the key alone decides how a
step treats its array (``interpolation``: images trilinear, labels nearest).
The spatial steps record themselves in each MetaTensor's
``applied_operations``, so a result in plan space goes back onto the file's
grid by MONAI's own inverse (``to_file_grid``), not by hand-kept geometry.

The steps, in nnU-Net's order (``read_case`` runs the first, ``plan_space``
all four):

1. ``LoadCased``: the files, channel first, with their affine;
2. ``Orientationd``: to RAS;
3. ``CropNonzerod``: to the box of voxels nonzero in any image channel
   (``nonzero_box``, MONAI's ``generate_spatial_bounding_box``);
4. ``ToSpacingd``: to the plan's spacing in voxel space with MONAI's ``Resize``
   (torch interpolate), not ``Spacing`` (grid_sample), whose coordinate grid
   three times the output's size does not fit a 512x512x400 CT in a 2-core
   site's memory, and whose sampling grid differs from nnU-Net's.

Raw voxels for the preflight check come from ``open_voxels``: a NIfTI file
(``open_nifti``, the one place one is opened), a DICOM series folder or a
DICOM-SEG on its case's series (common/dicom_series.py). A DICOM channel enters
the pipeline as the same MetaTensor a NIfTI file gives (float32, RAS affine,
``pixdim``), with no header of its own; ``ras_axes`` is the one place RAS axis
order is read.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.transforms.utils import convert_applied_interp_mode, generate_spatial_bounding_box, reset_ops_id
from monai.utils import TraceKeys

from .dataset import DICOM_SEG_ENDING, Case
from .dicom_series import DicomSeriesError, open_series, seg_labels, series_voxels

IMAGE, LABEL = "image", "label"
RAS = "RAS"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def label_keys(case: Case) -> tuple[str, ...]:
    """One key per annotator: ``label`` for the reference, ``label_1``, ... for the others."""
    return tuple(LABEL if a == 0 else f"{LABEL}_{a}" for a in range(len(case.labels)))


def case_dict(case: Case) -> dict[str, tuple[Path, ...] | Path]:
    """The case as the pipeline's input: its image files and one label file per annotator."""
    return {IMAGE: case.images, **dict(zip(label_keys(case), case.labels, strict=True))}


def interpolation(key: Hashable) -> str:
    """The one place that picks how an array is resampled: an image trilinear, any label map nearest."""
    return "trilinear" if key == IMAGE else "nearest-exact"


def load_nifti(path: Path) -> nib.Nifti1Image:
    """The NIfTI file's image, its voxels not yet read (a NIfTI-2 file loads as Nifti1Image's subclass)."""
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image):  # nibabel's load() is typed for every image kind it reads
        raise ValueError(f"{path}: nibabel reads it as {type(img).__name__}, not as a NIfTI image")
    return img


def open_nifti(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The file's header and its voxels as stored (dtype and memory order of the file)."""
    img = load_nifti(path)
    return img, np.asanyarray(img.dataobj)


@dataclass(frozen=True)
class Voxels:
    """What the preflight check reads of one image channel or label map, whatever the file format."""

    affine: np.ndarray
    zooms: np.ndarray
    data: np.ndarray


def open_voxels(path: Path, series: Path | None = None) -> Voxels:
    """A NIfTI file, a DICOM series folder, or (``series`` given) a DICOM-SEG label on that series' voxels."""
    if path.is_dir():
        opened = open_series(path)
        return Voxels(opened.affine, opened.zooms, series_voxels(opened))
    if path.name.endswith(DICOM_SEG_ENDING):
        opened = open_series(_seg_source(path, series))
        return Voxels(opened.affine, opened.zooms, seg_labels(path, opened))
    img, data = open_nifti(path)
    return Voxels(img.affine, np.asarray(img.header.get_zooms()[:3], dtype=float), data)


def _seg_source(path: Path, series: Path | None) -> Path:
    if series is None or not series.is_dir():
        raise DicomSeriesError(
            f"{path}: a DICOM-SEG label needs its case's image to be a DICOM series folder "
            "(imagesTr/<case>_0000/); give a NIfTI label for a NIfTI image."
        )
    return series


def ras_axes(affine: np.ndarray) -> np.ndarray:
    """For each RAS axis, the voxel axis that runs along it (nibabel's io_orientation)."""
    return np.argsort(nib.orientations.io_orientation(affine)[:, 0])


def nonzero_box(image: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """nnU-Net's crop: (start, stop) per axis of the voxels nonzero in any channel; the whole volume if none."""
    start, stop = generate_spatial_bounding_box(image, select_fn=lambda x: x != 0)
    if not any(b > a for a, b in zip(start, stop, strict=True)):
        return tuple((0, int(s)) for s in image.shape[1:])
    return tuple((int(a), int(b)) for a, b in zip(start, stop, strict=True))


def _load_3d_file(path: Path, file_layout: bool) -> MetaTensor:
    """One 3D NIfTI file as MONAI's LoadImage gives it (float32, channel first, same metadata), faster.

    nibabel hands the voxels over in the file's (Fortran) order. LoadImage reorders
    them in numpy, which for a 512x512x300 CT takes 3-4 times as long as reading
    the file; ``file_layout`` keeps that order (same values, transposed strides),
    otherwise torch reorders in one pass (1.5 times faster than LoadImage).
    """
    img, stored = open_nifti(path)
    voxels = torch.from_numpy(stored)
    if file_layout:
        data = voxels.to(torch.float32)[None]
    else:
        data = torch.empty((1, *voxels.shape), dtype=torch.float32)
        data[0].copy_(voxels)
    return _meta_tensor(data, img.affine, np.array(img.header["pixdim"], dtype=np.float32), path)


def _meta_tensor(data: torch.Tensor, affine: np.ndarray, pixdim: np.ndarray, source: Path) -> MetaTensor:
    """The metadata every loaded array carries: affine, pixdim, RAS space and its file; nothing else."""
    meta = {"original_affine": np.asarray(affine), "filename_or_obj": str(source), "space": RAS, "pixdim": pixdim}
    return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def _dicom_pixdim(zooms: np.ndarray) -> np.ndarray:
    """A NIfTI-style pixdim (qfac, three spacings, then units of the unused axes) for a DICOM volume."""
    return np.array([1.0, *zooms, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)


def load_dicom_image(folders: Sequence[Path]) -> MetaTensor:
    """One series folder per channel -> float32 [C, columns, rows, slices]; the channels must share a grid."""
    series = [open_series(Path(f)) for f in folders]
    for other in series[1:]:
        if other.shape != series[0].shape or not np.allclose(other.affine, series[0].affine, atol=1e-3):
            raise DicomSeriesError(
                f"{other.folder}: its grid {other.shape} differs from {series[0].folder}'s "
                f"{series[0].shape} (or its position); a case's channels must be registered "
                "series of the same grid."
            )
    data = torch.from_numpy(np.stack([series_voxels(s) for s in series]))
    return _meta_tensor(data, series[0].affine, _dicom_pixdim(series[0].zooms), series[0].folder)


def load_image(paths: Sequence[Path], file_layout: bool = False) -> MetaTensor:
    """Channel-first float32 image in its stored orientation: one 3D file per channel, or one 4D file.

    ``file_layout``: see _load_3d_file; only where no reduction over the whole volume
    depends on the memory order (its float rounding would), i.e. not for training caches.
    """
    if Path(paths[0]).is_dir():
        return load_dicom_image(paths)
    if len(paths) == 1 and len(load_nifti(paths[0]).shape) == 3:
        return _load_3d_file(paths[0], file_layout)
    loader = mt.LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)
    files = [str(p) for p in paths]
    return loader(files if len(files) > 1 else files[0])


def load_label(path: Path, series: Path | None = None) -> MetaTensor:
    """A label map [1, X, Y, Z] uint8 in its stored orientation; a DICOM-SEG on the case's ``series`` folder."""
    if Path(path).name.endswith(DICOM_SEG_ENDING):
        source = open_series(_seg_source(Path(path), series))
        labels = torch.from_numpy(seg_labels(Path(path), source))[None]
        return _meta_tensor(labels, source.affine, _dicom_pixdim(source.zooms), Path(path))
    loader = mt.LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.uint8)
    return loader(str(path))


class LoadCased(mt.MapTransform):
    """MONAI's LoadImaged for a case's keys: ``image`` float32 [C, ...], each label key uint8 [1, ...].

    Not LoadImaged itself: that always copies the voxels into C order, which for a
    large CT costs more than reading it (see _load_3d_file); the values and the
    metadata are the same.
    """

    def __init__(self, keys: Sequence[str], file_layout: bool = False) -> None:
        super().__init__(keys)
        self.file_layout = file_layout

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        images = tuple(data[IMAGE]) if IMAGE in data else ()
        series = Path(images[0]) if images and Path(images[0]).is_dir() else None  # a label SEG lies on it
        for key in self.key_iterator(d):
            d[key] = load_image(tuple(d[key]), self.file_layout) if key == IMAGE else load_label(d[key], series)
        return d


class CropNonzerod(mt.MapTransform, mt.InvertibleTransform):
    """Crop every key to the image's ``nonzero_box``; the inverse pads back with zeros."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        box = nonzero_box(d[IMAGE])
        if all(b - a == s for (a, b), s in zip(box, d[IMAGE].shape[1:], strict=True)):
            return d
        crop = mt.SpatialCropd(list(self.key_iterator(d)), roi_start=[a for a, _ in box], roi_end=[b for _, b in box])
        return crop(d)

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if _last_operation(d[key]) == "SpatialCrop":
                d[key] = mt.SpatialCrop(roi_start=[0, 0, 0], roi_end=[1, 1, 1]).inverse(d[key])
        return d


def plan_size(image: MetaTensor, spacing: Sequence[float]) -> list[int]:
    """The image's spatial size at ``spacing`` (its extent in mm kept, as nnU-Net resamples)."""
    pixdim = np.asarray(image.pixdim, dtype=float)[:3]
    return [max(1, round(s * p / t)) for s, p, t in zip(image.shape[1:], pixdim, spacing, strict=True)]


class ToSpacingd(mt.MapTransform, mt.InvertibleTransform):
    """Resample every key to ``spacing`` in voxel space (Resize, mode by key); the inverse resizes back.

    The inverse reads the sizes from the steps recorded on the array: ``spacing`` None makes a
    transform that only inverts.
    """

    def __init__(self, keys: Sequence[str], spacing: Sequence[float] | None) -> None:
        super().__init__(keys)
        self.spacing = spacing

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.spacing is None:
            raise TypeError("this transform was made without a spacing: it only inverts")
        size = plan_size(d[IMAGE], self.spacing)
        for key in self.key_iterator(d):
            if list(size) != list(d[key].shape[1:]):
                d[key] = mt.Resize(spatial_size=size, mode=interpolation(key), anti_aliasing=False)(d[key])
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if _last_operation(d[key]) == "Resize":
                dtype = d[key].dtype  # a label map goes back as the integers it came as
                d[key] = mt.Resize(spatial_size=1).inverse(d[key]).to(dtype)
        return d


def _last_operation(tensor: MetaTensor) -> str | None:
    """The class name of the last spatial step recorded on ``tensor`` (steps that changed nothing record none)."""
    return tensor.applied_operations[-1][TraceKeys.CLASS_NAME] if tensor.applied_operations else None


def read_case(keys: Sequence[str], file_layout: bool = False) -> mt.Compose:
    """Load the keys' files, channel first, in their stored orientation (what the fingerprint reads)."""
    return mt.Compose([LoadCased(keys, file_layout)])


def _spatial_steps(keys: Sequence[str], spacing: Sequence[float] | None) -> list[mt.MapTransform]:
    return [mt.Orientationd(keys, axcodes=RAS, labels=RAS_LABELS), CropNonzerod(keys), ToSpacingd(keys, spacing)]


def plan_space(keys: Sequence[str], spacing: Sequence[float], file_layout: bool = False) -> mt.Compose:
    """Load, reorient to RAS, crop to the nonzero box and resample to ``spacing``; invertible."""
    return mt.Compose([LoadCased(keys, file_layout), *_spatial_steps(keys, spacing)])


def without_voxels(image: MetaTensor) -> MetaTensor:
    """``image``'s affine, metadata and recorded steps, without its voxels: enough for ``to_file_grid``."""
    return MetaTensor(torch.zeros(0), meta=dict(image.meta), applied_operations=list(image.applied_operations))


def to_file_grid(result: torch.Tensor | np.ndarray, image: MetaTensor, key: str) -> MetaTensor:
    """A plan-space result [C, X, Y, Z] back onto the grid of the file ``image`` was read from.

    MONAI's inverse of ``plan_space``, driven by the steps recorded on ``image``,
    resampling as ``key`` is resampled (``LABEL``: nearest, ``IMAGE``: trilinear).
    Outside the crop the result is 0.
    """
    operations = convert_applied_interp_mode(image.applied_operations, mode=interpolation(key))
    restored = MetaTensor(torch.as_tensor(result), meta=dict(image.meta), applied_operations=operations)
    reset_ops_id(restored)  # inverted by fresh transforms, not the instances that read the image
    return mt.Compose(_spatial_steps([IMAGE], None)).inverse({IMAGE: restored})[IMAGE]
