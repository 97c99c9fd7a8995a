"""A site's data fingerprint: aggregate statistics only, mergeable across sites.

nnU-Net plans from a fingerprint that lists every case's spacing and shape
and pools foreground intensity samples. In a federation those lists must not
leave the site, so each site sends **statistics over its cases** instead:

- spacing and foreground-cropped extent (mm) per RAS axis: quantiles at fixed
  levels (``SPACING_LEVELS``) over the site's cases;
- foreground intensities per channel: quantiles at fixed levels
  (``INTENSITY_LEVELS``, dense in the tails where CT clipping needs them) of
  up to ``SAMPLES_PER_CASE`` foreground voxels per case (nnU-Net samples the
  same way), plus the exact count, sum and sum of squares of all foreground
  voxels (so the federation's mean and std are exact);
- the voxel fraction of every class; the number of cases and channels.

Why quantile sketches and not histograms: percentiles cannot be merged from
per-site percentiles exactly, and a histogram fine enough to place the 0.5 %
and 99.5 % points to a few HU would be a long list, which the site's egress
guard refuses (``keys.EGRESS_MAX_LIST``). Each site's sketch is read as a
piecewise-linear CDF; the federation's CDF is their mixture weighted by the
sites' counts, inverted at the wanted level (``merged_quantile``). This is
exact for one site at the sketched levels and always brackets the true
federated quantile between the smallest and largest site quantile; with the
levels packed around 0.5 % and 99.5 % the error is a fraction of the spread
between sites. The record has the same keys and list lengths whatever the
number of cases, and holds no file names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from . import keys
from .dataset import Case, DatasetSpec

FINGERPRINT_FORMAT = 1
AXES = ("x", "y", "z")
SPACING_LEVELS = (5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0)
"""Percentiles of spacing and extent over a site's cases (nnU-Net uses the 10th and 50th)."""
INTENSITY_LEVELS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.9)
"""Percentiles of foreground intensities; CT clipping reads 0.5 and 99.5."""
SAMPLES_PER_CASE = 10_000
"""Foreground voxels sampled per case for the intensity quantiles (as nnU-Net does)."""
P = keys.FINGERPRINT_PREFIX


def _name(*parts: object) -> str:
    return P + "_".join(str(p) for p in parts)


class FingerprintError(ValueError):
    """A fingerprint record is malformed or sites disagree on what they hold."""


@dataclass
class CaseStats:
    """What one case contributes; stays at the site."""

    spacing: np.ndarray
    """Voxel spacing in mm along R, A, S."""
    extent: np.ndarray
    """Size in mm of the nonzero (foreground-cropped) box along R, A, S."""
    class_voxels: np.ndarray
    samples: list[np.ndarray]
    """Per channel: sampled foreground intensities."""
    moments: np.ndarray
    """[channel, (n, sum, sum of squares)] over every foreground voxel."""


def load_case_arrays(case: Case) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    """(reference image header, image [C, X, Y, Z] float32, reference label [X, Y, Z]) from disk."""
    channels = []
    first = None
    for path in case.images:
        img = nib.load(str(path))
        first = first or img
        data = np.asanyarray(img.dataobj).astype(np.float32, copy=False)
        channels.extend([data] if data.ndim == 3 else np.moveaxis(data, -1, 0))
    label = np.asanyarray(nib.load(str(case.label)).dataobj)
    return first, np.stack(channels), label


def ras_axes(affine: np.ndarray) -> np.ndarray:
    """For each RAS axis, the voxel axis that runs along it (nibabel's io_orientation)."""
    ornt = nib.orientations.io_orientation(affine)
    order = np.empty(3, dtype=int)
    order[ornt[:, 0].astype(int)] = np.arange(3)
    return order


def nonzero_box(image: np.ndarray) -> tuple[slice, ...]:
    """nnU-Net's crop: the bounding box of voxels nonzero in any channel (whole volume if none)."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def case_stats(case: Case, num_classes: int, rng: np.random.Generator) -> CaseStats:
    header, image, label = load_case_arrays(case)
    zooms = np.asarray(header.header.get_zooms()[:3], dtype=float)
    order = ras_axes(header.affine)
    box = nonzero_box(image)
    crop_shape = np.array([s.stop - s.start for s in box], dtype=float)
    foreground = label > 0
    samples, moments = [], []
    for channel in image:
        values = channel[foreground].astype(np.float64)
        take = min(SAMPLES_PER_CASE, values.size)
        samples.append(rng.choice(values, size=take, replace=False) if take else values)
        moments.append([values.size, values.sum(), np.square(values).sum()])
    counts = np.bincount(np.rint(label).astype(np.int64).ravel().clip(0, num_classes - 1), minlength=num_classes)
    return CaseStats(
        spacing=zooms[order],
        extent=(crop_shape * zooms)[order],
        class_voxels=counts[:num_classes],
        samples=samples,
        moments=np.asarray(moments, dtype=np.float64),
    )


def _chunks(name: str, values: Sequence[float]) -> dict[str, list[float]]:
    """Lists longer than the egress limit are split into numbered parts."""
    size = keys.EGRESS_MAX_LIST
    return {f"{name}_{i // size}": [float(v) for v in values[i:i + size]] for i in range(0, len(values), size)}


def _unchunk(record: dict, name: str) -> list[float]:
    out, i = [], 0
    while f"{name}_{i}" in record:
        out.extend(record[f"{name}_{i}"])
        i += 1
    return out


def site_fingerprint(spec: DatasetSpec, case_ids: Iterable[str], seed: int = 0) -> dict[str, int | float | list]:
    """The MetricRecord-ready fingerprint of the named cases: statistics only."""
    rng = np.random.default_rng(seed)
    stats = [case_stats(spec.case(i), spec.num_classes, rng) for i in case_ids]
    if not stats:
        raise FingerprintError("a fingerprint needs at least one case.")
    spacing = np.stack([s.spacing for s in stats])
    extent = np.stack([s.extent for s in stats])
    class_voxels = np.sum([s.class_voxels for s in stats], axis=0).astype(np.float64)
    record: dict[str, int | float | list] = {
        _name("format"): FINGERPRINT_FORMAT,
        _name("cases"): len(stats),
        _name("channels"): spec.num_channels,
        _name("ct"): [int(v) for v in spec.channel_is_ct],
    }
    for a, axis in enumerate(AXES):
        record[_name("spacing", axis)] = [float(v) for v in np.percentile(spacing[:, a], SPACING_LEVELS)]
        record[_name("extent", axis)] = [float(v) for v in np.percentile(extent[:, a], SPACING_LEVELS)]
    record |= _chunks(_name("class_fraction"), class_voxels / class_voxels.sum())
    for c in range(spec.num_channels):
        pooled = np.concatenate([s.samples[c] for s in stats])
        n, total, squares = np.sum([s.moments[c] for s in stats], axis=0)
        quantiles = np.percentile(pooled, INTENSITY_LEVELS) if pooled.size else np.zeros(len(INTENSITY_LEVELS))
        record[_name("intensity", c)] = [float(v) for v in quantiles]
        record[_name("fg_voxels", c)] = float(n)
        record[_name("fg_sum", c)] = float(total)
        record[_name("fg_sumsq", c)] = float(squares)
    return record


# --- merging --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sketch:
    """Quantile values at fixed percentile levels, with the weight of their owner."""

    levels: tuple[float, ...]
    values: tuple[float, ...]
    weight: float


def _cdf(sketch: Sketch, x: np.ndarray, left: bool) -> np.ndarray:
    """The site's CDF at ``x`` (right-continuous), or its left limit when ``left``.

    The sketch is read as: mass ``levels[0]`` at the lowest value, linear in
    between, the remaining mass at the highest value; repeated values are a
    point mass (all cases of a site share one spacing, for instance).
    """
    values = np.asarray(sketch.values, dtype=float)
    probs = np.asarray(sketch.levels, dtype=float) / 100.0
    unique, first = np.unique(values, return_index=True)
    _, last_rev = np.unique(values[::-1], return_index=True)
    p_first, p_last = probs[first], probs[::-1][last_rev].copy()
    p_last[-1] = 1.0
    j = np.searchsorted(unique, x, side="left" if left else "right") - 1
    out = np.empty(len(x))
    for i, (xi, ji) in enumerate(zip(x, j)):
        if ji < 0:
            out[i] = 0.0
        elif ji == len(unique) - 1:
            out[i] = 1.0 if (left or xi > unique[ji]) else p_last[ji]
        elif not left and xi == unique[ji]:
            out[i] = p_last[ji]
        else:
            lo, hi = unique[ji], unique[ji + 1]
            out[i] = p_last[ji] + (xi - lo) / (hi - lo) * (p_first[ji + 1] - p_last[ji])
    return out


def merged_quantile(sketches: Sequence[Sketch], percentile: float) -> float:
    """The federation's quantile: invert the weight-mixed CDF of the sites' sketches."""
    sketches = [s for s in sketches if s.weight > 0]
    if not sketches:
        raise FingerprintError("no site contributed to this statistic.")
    knots = np.unique(np.concatenate([s.values for s in sketches]))
    total = sum(s.weight for s in sketches)
    at = sum(s.weight * _cdf(s, knots, left=False) for s in sketches) / total
    before = sum(s.weight * _cdf(s, knots, left=True) for s in sketches) / total
    target = percentile / 100.0
    for i, knot in enumerate(knots):
        if target <= at[i]:
            if target >= before[i] or i == 0:
                return float(knot)
            lo, hi = at[i - 1], before[i]
            return float(knots[i - 1] + (target - lo) / (hi - lo) * (knot - knots[i - 1]))
    return float(knots[-1])


@dataclass
class FederatedFingerprint:
    """The merge of every site's fingerprint: what the planner reads."""

    num_cases: int
    num_channels: int
    channel_is_ct: list[bool]
    spacing: list[list[Sketch]]
    """Per RAS axis: one sketch per site (weight = cases)."""
    extent: list[list[Sketch]]
    intensity: list[list[Sketch]]
    """Per channel: one sketch per site (weight = foreground voxels)."""
    fg_moments: np.ndarray
    """[channel, (n, sum, sum of squares)] over the federation."""
    class_fraction: list[float]
    sites: list[str] = field(default_factory=list)

    def spacing_percentile(self, axis: int, percentile: float) -> float:
        return merged_quantile(self.spacing[axis], percentile)

    def extent_percentile(self, axis: int, percentile: float) -> float:
        return merged_quantile(self.extent[axis], percentile)

    def intensity_percentile(self, channel: int, percentile: float) -> float:
        return merged_quantile(self.intensity[channel], percentile)

    def intensity_mean_std(self, channel: int) -> tuple[float, float]:
        n, total, squares = self.fg_moments[channel]
        if n <= 0:
            raise FingerprintError(f"channel {channel}: no foreground voxels in the federation.")
        mean = total / n
        return float(mean), float(np.sqrt(max(squares / n - mean * mean, 0.0)))


def _get(record: dict, name: str, site: str):
    if name not in record:
        raise FingerprintError(f"fingerprint of site {site} lacks '{name}'.")
    return record[name]


def merge_fingerprints(records: dict[str, dict]) -> FederatedFingerprint:
    """Merge site fingerprints (site name -> record); sites must agree on format and channels."""
    if not records:
        raise FingerprintError("no site fingerprint to merge.")
    first_site, first = next(iter(records.items()))
    channels = int(_get(first, _name("channels"), first_site))
    ct = [bool(v) for v in _get(first, _name("ct"), first_site)]
    spacing = [[] for _ in AXES]
    extent = [[] for _ in AXES]
    intensity = [[] for _ in range(channels)]
    moments = np.zeros((channels, 3))
    class_fraction, cases = None, 0
    for site, rec in records.items():
        if int(_get(rec, _name("format"), site)) != FINGERPRINT_FORMAT:
            raise FingerprintError(f"site {site} sends fingerprint format {rec[_name('format')]}, "
                                   f"the server reads {FINGERPRINT_FORMAT}; update fedseg at that site.")
        if int(_get(rec, _name("channels"), site)) != channels or [bool(v) for v in rec[_name("ct")]] != ct:
            raise FingerprintError(f"site {site} declares different channels (or CT flags) than site "
                                   f"{first_site}; every site's dataset.json must list the same channels.")
        n = int(_get(rec, _name("cases"), site))
        cases += n
        for a, axis in enumerate(AXES):
            spacing[a].append(Sketch(SPACING_LEVELS, tuple(_get(rec, _name("spacing", axis), site)), n))
            extent[a].append(Sketch(SPACING_LEVELS, tuple(_get(rec, _name("extent", axis), site)), n))
        for c in range(channels):
            fg = float(_get(rec, _name("fg_voxels", c), site))
            intensity[c].append(Sketch(INTENSITY_LEVELS, tuple(_get(rec, _name("intensity", c), site)), fg))
            moments[c] += [fg, float(rec[_name("fg_sum", c)]), float(rec[_name("fg_sumsq", c)])]
        fractions = np.asarray(_unchunk(rec, _name("class_fraction")), dtype=float)
        class_fraction = fractions * n if class_fraction is None else class_fraction + fractions * n
    return FederatedFingerprint(
        num_cases=cases,
        num_channels=channels,
        channel_is_ct=ct,
        spacing=spacing,
        extent=extent,
        intensity=intensity,
        fg_moments=moments,
        class_fraction=[float(v) for v in class_fraction / max(cases, 1)],
        sites=list(records),
    )
