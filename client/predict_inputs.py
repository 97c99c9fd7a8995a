"""Before predict segments anything: is each input the kind of scan the model was trained on?

A model trained on MRI runs on a head CT without complaint and returns
nonsense. The plan says, per channel, whether the model saw CT (``ct``
normalization: Hounsfield units clipped to the federation's foreground range)
or another modality (``zscore``: MR and the like). Each input is compared
with that:

- a DICOM series by its ``Modality`` header (headers only, no voxels read);
- a NIfTI file by its intensities: a CT scan holds air at about -1000 HU, so an
  input whose 1st percentile is at or below ``CT_AIR_HU`` looks like CT and
  one above it does not; a CT input whose range misses the model's clip
  range altogether is named too.

The channel count is compared first: an input with another number of channels
cannot go through the network at all, so that is an error whatever
``--strict`` says. The rest are warnings, or with ``--strict`` refusals, each
naming the file and what differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.dicom_series import open_series
from common.plan import Plan
from common.reading import load_nifti, open_nifti

CT_AIR_HU = -500.0
"""An image whose 1st percentile is at or below this looks like CT (air is about -1000 HU; MR is not negative)."""
SUBSAMPLE = 2
"""Every SUBSAMPLE-th voxel along each axis is enough to place the 1st and 99th percentiles."""
LOW, HIGH = 1.0, 99.0


def _trained(plan: Plan, channel: int) -> str:
    norm = plan.normalization[channel]
    if norm.scheme == "ct":
        return f"CT (Hounsfield units, clip range {norm.clip_low:.0f}..{norm.clip_high:.0f})"
    return "a non-CT modality such as MR (intensities z-scored per scan)"


def channel_count(paths: tuple[Path, ...]) -> int:
    """Channels of one case: one per series folder or 3D file, the 4th axis of a single 4D NIfTI file."""
    if len(paths) == 1 and not paths[0].is_dir():
        shape = load_nifti(paths[0]).shape  # the header only
        return int(shape[3]) if len(shape) == 4 else 1
    return len(paths)


def _dicom_mismatch(folder: Path, channel: int, plan: Plan) -> str | None:
    series = open_series(folder)  # a folder that is not one volume is refused here, with its problems
    trained_ct = plan.normalization[channel].scheme == "ct"
    if series.modality and (series.modality == "CT") != trained_ct:
        return (
            f"{folder}: channel {channel} is DICOM Modality {series.modality}, the model was trained on "
            f"{_trained(plan, channel)}"
        )
    return None


def _nifti_mismatches(path: Path, plan: Plan, first: int) -> list[str]:
    """One NIfTI file's channels (``first`` is the model channel of its first volume) against the plan."""
    _, data = open_nifti(path)
    volumes = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
    found = []
    for channel, volume in enumerate(volumes, first):
        sample = np.asarray(volume[::SUBSAMPLE, ::SUBSAMPLE, ::SUBSAMPLE], dtype=np.float64)
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            continue
        low, high = np.percentile(sample, [LOW, HIGH])
        norm = plan.normalization[channel]
        looks_ct = low <= CT_AIR_HU
        seen = f"intensities {low:.4g}..{high:.4g} (1st..99th percentile)"
        if looks_ct != (norm.scheme == "ct"):
            what = "look like CT (air below -500)" if looks_ct else "do not look like CT (no air near -1000 HU)"
            found.append(f"{path}: channel {channel} {seen} {what}; the model was trained on {_trained(plan, channel)}")
        elif norm.scheme == "ct" and (high < norm.clip_low or low > norm.clip_high):
            found.append(
                f"{path}: channel {channel} {seen} lie outside the model's CT clip range "
                f"{norm.clip_low:.0f}..{norm.clip_high:.0f}"
            )
    return found


def input_mismatches(paths: tuple[Path, ...], plan: Plan) -> list[str]:
    """How one case's channels differ from what the model was trained on (empty: nothing noticed)."""
    if paths[0].is_dir():
        return [m for c, folder in enumerate(paths) if (m := _dicom_mismatch(folder, c, plan))]
    return [m for c, path in enumerate(paths) for m in _nifti_mismatches(path, plan, c)]
