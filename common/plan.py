"""The federation's preprocessing plan: nnU-Net's self-configuration rules, as data.

A plan fixes what every site does to its scans before training or
prediction: the target spacing, the training patch (and sliding-window) size,
and the intensity normalization per channel. It is made from the merged
fingerprint (``common.fingerprint``) by the rules below, one function per
decision, stored as JSON in the run directory (``runs/<run>/plan.json``), and
sent to the sites in every train/evaluate ConfigRecord. Its ``version`` is a
hash of the decisions alone, so a site's cache folder named after it is
reused exactly when the preprocessing is the same.

Settings in the federation YAML win over the rules: a non-empty
``data.spacing`` or ``data.patch_size`` is taken as is (the plan records it as
``fixed_by_config``), and ``data.normalization`` other than ``auto`` forces
one scheme for every channel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from .config import DataConfig, ModelConfig
from .files import atomic_write_text
from .fingerprint import MAX_CHANNELS, FederatedFingerprint
from .labels import CODE_BITS
from .runs import PLAN_FILE

_N = TypeVar("_N", int, float)

PLAN_FORMAT = 1
ANISOTROPY_THRESHOLD = 3.0
"""nnU-Net: an axis whose spacing exceeds 3x the others' (and holds 3x fewer voxels) is anisotropic."""
ANISOTROPIC_PERCENTILE = 10.0
"""nnU-Net resamples an anisotropic axis to the 10th percentile of its spacings, not the median."""
SPACING_EPSILON = 1e-5
SIGNIFICANT_DIGITS = 4
"""Plan spacings are rounded so that merged quantiles do not carry float noise into the version."""
MEDIAN = 50.0
MAX_CLASSES = 1024
"""Most labels a plan may declare: it sizes every site's model, so a plan from a hostile centre cannot make a site
build a network it cannot hold."""
PLAN_SPACING_RANGE_MM = (0.1, 50.0)
"""Planned spacings outside this range are clamped (made) or refused (received): no clinical scan needs them,
and a finer grid multiplies every site's voxels, memory and time (a hostile fingerprint's aim)."""
MAX_AXIS_VOXELS = 1024
"""Most voxels the median case may span along one axis at the planned spacing; a finer spacing is coarsened."""
MAX_PATCH_AXIS = 512
"""Longest patch side a received plan may ask for."""

Scheme = Literal["ct", "zscore"]


class PlanError(ValueError):
    """A plan is missing, malformed or cannot be made; the message says what to do."""


@dataclass(frozen=True)
class ChannelNorm:
    """How one channel's intensities are normalized.

    ``ct``: clip to the federation's foreground [clip_low, clip_high], then
    z-score with the federation's foreground mean and std (nnU-Net's
    CTNormalization). ``zscore``: each case by its own mean and std.
    """

    scheme: Scheme
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None

    def ct_values(self) -> tuple[float, float, float, float]:
        """(clip_low, clip_high, mean, std) of a ``ct`` channel; a TypeError when the plan lacks one."""
        if self.clip_low is None or self.clip_high is None or self.mean is None or self.std is None:
            raise TypeError(f"a ct channel's normalization needs clip_low, clip_high, mean and std: {self}")
        return self.clip_low, self.clip_high, self.mean, self.std


@dataclass(frozen=True)
class Plan:
    target_spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    normalization: tuple[ChannelNorm, ...]
    median_shape: tuple[int, int, int]
    """Median foreground-cropped shape at the target spacing (informative)."""
    label_codes: tuple[int, ...] = ()
    """The federation's labels: the code of each value's name (common/labels.py); empty: a site-local plan."""
    remap_labels: bool = False
    """Whether a site whose label names match but whose values differ remaps them (data.remap_labels)."""
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    """Who made the plan from what: planner, sites, case count, time, config overrides."""

    def decisions(self) -> dict[str, Any]:
        return {
            "target_spacing": list(self.target_spacing),
            "patch_size": list(self.patch_size),
            "normalization": [dataclasses.asdict(n) for n in self.normalization],
            "label_codes": list(self.label_codes),
            "remap_labels": self.remap_labels,
        }

    @property
    def version(self) -> str:
        digest = hashlib.sha256(json.dumps(self.decisions(), sort_keys=True).encode()).hexdigest()
        return digest[:12]

    def to_json(self) -> str:
        body = {
            "format": PLAN_FORMAT,
            "version": self.version,
            **self.decisions(),
            "median_shape": list(self.median_shape),
            "provenance": self.provenance,
        }
        return json.dumps(body, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        try:
            body = json.loads(text)
            if body.get("format") != PLAN_FORMAT:
                raise PlanError(f"{source}: plan format {body.get('format')!r}, this fedseg reads {PLAN_FORMAT}.")
            plan = cls(
                target_spacing=_per_axis(float, body["target_spacing"]),
                patch_size=_per_axis(int, body["patch_size"]),
                normalization=tuple(ChannelNorm(**n) for n in body["normalization"]),
                median_shape=_per_axis(int, body["median_shape"]),
                label_codes=tuple(int(v) for v in body.get("label_codes", [])),
                remap_labels=bool(body.get("remap_labels", False)),
                provenance=dict(body.get("provenance", {})),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PlanError(f"{source} is not a fedseg plan ({err}); make one with a federated run.") from err
        plan.check_bounds(source)
        if body.get("version") not in (None, plan.version):
            raise PlanError(
                f"{source}: its version {body['version']} does not match its content "
                f"({plan.version}); the file was edited by hand or truncated."
            )
        return plan

    def check_bounds(self, source: str) -> None:
        """Refuse a plan that would make a site resample to an absurd grid or train on an absurd patch."""
        low, high = PLAN_SPACING_RANGE_MM
        if not all(math.isfinite(v) and low <= v <= high for v in self.target_spacing):
            raise PlanError(
                f"{source}: target spacing {list(self.target_spacing)} mm is outside [{low}, {high}] mm; "
                f"this site will not resample to it."
            )
        if not all(1 <= v <= MAX_PATCH_AXIS for v in self.patch_size):
            raise PlanError(f"{source}: patch size {list(self.patch_size)} is outside [1, {MAX_PATCH_AXIS}] per axis.")
        if not 1 <= len(self.normalization) <= MAX_CHANNELS or len(self.label_codes) > MAX_CLASSES:
            raise PlanError(
                f"{source}: {len(self.normalization)} channel(s) and {len(self.label_codes)} label(s); a "
                f"plan holds 1 to {MAX_CHANNELS} channels and at most {MAX_CLASSES} labels."
            )
        if not all(0 <= c < 1 << CODE_BITS for c in self.label_codes):
            raise PlanError(f"{source}: a label code is outside [0, 2**{CODE_BITS}).")

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> Plan:
        if not Path(path).is_file():
            raise PlanError(
                f"{path} not found: a plan is written by the server at the start of a run "
                f"(runs/<run>/{PLAN_FILE}) and kept by each site in its state directory."
            )
        return cls.from_json(Path(path).read_text(), str(path))

    def data_config(self, data: DataConfig) -> DataConfig:
        """``data`` with the plan's spacing and patch size filled in, for the loops."""
        return data.replace(spacing=list(self.target_spacing), patch_size=list(self.patch_size))


# --- the rules ---------------------------------------------------------------------------


def _per_axis(kind: Callable[[Any], _N], values: Sequence[Any]) -> tuple[_N, _N, _N]:
    """One value per spatial axis, each made a ``kind``; a TypeError (a malformed plan) for another count."""
    if len(values) != 3:
        raise TypeError(f"{len(values)} values where a plan holds one per axis (3)")
    return kind(values[0]), kind(values[1]), kind(values[2])


def downsampling_factor(model: ModelConfig) -> int:
    """Patch sides must be multiples of the network's total stride."""
    return int(np.prod(model.strides)) if model.strides else 1


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def target_spacing(fp: FederatedFingerprint) -> tuple[list[float], bool]:
    """nnU-Net's full-resolution target spacing: the median spacing per axis, except
    on anisotropic data, where the median of the coarse axis would throw away
    most of the in-plane resolution's partner slices; there the coarse axis goes
    to the 10th percentile of its spacings (never finer than the other axes).
    Returns (spacing, anisotropic)."""
    median = [fp.spacing_percentile(a, MEDIAN) for a in range(3)]
    median_size = [fp.extent_percentile(a, MEDIAN) / median[a] for a in range(3)]
    worst = int(np.argmax(median))
    others = [a for a in range(3) if a != worst]
    other_spacing = max(median[a] for a in others)
    aniso_spacing = median[worst] > ANISOTROPY_THRESHOLD * other_spacing
    aniso_voxels = median_size[worst] * ANISOTROPY_THRESHOLD < min(median_size[a] for a in others)
    target = list(median)
    if aniso_spacing and aniso_voxels:
        coarse = fp.spacing_percentile(worst, ANISOTROPIC_PERCENTILE)
        if coarse < other_spacing:
            coarse = max(other_spacing, coarse) + SPACING_EPSILON
        target[worst] = coarse
    extent = [fp.extent_percentile(a, MEDIAN) for a in range(3)]
    return [_round(clamp_spacing(v, extent[a])) for a, v in enumerate(target)], aniso_spacing and aniso_voxels


def clamp_spacing(spacing: float, median_extent: float) -> float:
    """``spacing`` within PLAN_SPACING_RANGE_MM, and coarse enough that the median case spans at most
    MAX_AXIS_VOXELS voxels: a bound on what any fingerprint, honest or not, can make the sites compute."""
    low, high = PLAN_SPACING_RANGE_MM
    return min(high, max(low, spacing, median_extent / MAX_AXIS_VOXELS))


def median_shape(fp: FederatedFingerprint, spacing: list[float]) -> list[int]:
    return [max(1, round(fp.extent_percentile(a, MEDIAN) / spacing[a])) for a in range(3)]


def patch_size(shape: list[int], spacing: list[float], max_voxels: int, factor: int) -> list[int]:
    """nnU-Net's patch rule under a voxel budget: start isotropic in mm with the budget's
    volume, never larger than the median shape (rounded up to the network's stride),
    then shrink the axis that is largest relative to the median shape until it fits."""
    inverse = 1.0 / np.asarray(spacing, dtype=float)
    start = inverse / np.prod(inverse) ** (1 / 3) * max_voxels ** (1 / 3)
    limit = [min(math.ceil(s / factor) * factor, MAX_PATCH_AXIS // factor * factor) for s in shape]
    patch = [max(factor, min(limit[a], math.floor(start[a] / factor + SPACING_EPSILON) * factor)) for a in range(3)]
    while int(np.prod(patch)) > max_voxels:
        ratios = [patch[a] / shape[a] if patch[a] > factor else -1.0 for a in range(3)]
        axis = int(np.argmax(ratios))
        if ratios[axis] < 0:
            break
        patch[axis] -= factor
    return patch


def normalization(fp: FederatedFingerprint, data: DataConfig) -> list[ChannelNorm]:
    """CT channels: clip to the federation's foreground percentiles, z-score with its
    foreground statistics (Hounsfield units mean the same at every site). Other
    modalities have arbitrary units per scanner and case: per-case z-score."""
    low, high = data.clip_percentiles
    out = []
    for c in range(fp.num_channels):
        scheme = data.normalization if data.normalization != "auto" else ("ct" if fp.channel_is_ct[c] else "zscore")
        if scheme == "ct":
            mean, std = fp.intensity_mean_std(c)
            out.append(
                ChannelNorm(
                    "ct",
                    fp.intensity_percentile(c, low),
                    fp.intensity_percentile(c, high),
                    mean,
                    max(std, SPACING_EPSILON),
                )
            )
        else:
            out.append(ChannelNorm("zscore"))
    return out


def make_plan(fp: FederatedFingerprint, data: DataConfig, model: ModelConfig, planner: str) -> Plan:
    """Apply every rule to a merged fingerprint; explicit config values win."""
    fixed = []
    if data.spacing:
        spacing, anisotropic = [float(v) for v in data.spacing], None
        fixed.append("data.spacing")
    else:
        spacing, anisotropic = target_spacing(fp)
    shape = median_shape(fp, spacing)
    if data.patch_size:
        patch = [int(v) for v in data.patch_size]
        fixed.append("data.patch_size")
    else:
        patch = patch_size(shape, spacing, data.max_patch_voxels, downsampling_factor(model))
    if data.normalization != "auto":
        fixed.append("data.normalization")
    return Plan(
        target_spacing=_per_axis(float, spacing),
        patch_size=_per_axis(int, patch),
        normalization=tuple(normalization(fp, data)),
        median_shape=_per_axis(int, shape),
        provenance={
            "planner": planner,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sites": list(fp.sites),
            "num_cases": fp.num_cases,
            "anisotropic": anisotropic,
            "fixed_by_config": fixed,
            "max_patch_voxels": data.max_patch_voxels,
            "clip_percentiles": list(data.clip_percentiles),
            "class_fraction": fp.class_fraction,
        },
    )
