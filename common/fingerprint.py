"""A site's data fingerprint: aggregate statistics only, mergeable across sites.

nnU-Net plans from a fingerprint that lists every case's spacing and shape
and pools foreground intensity samples. In a federation those lists must not
leave the site, so each site sends **statistics over its cases** instead:

- spacing and foreground-cropped extent (mm) per RAS axis: quantiles at fixed
  levels (``SPACING_LEVELS``) over the site's cases;
- foreground intensities per channel: quantiles at fixed levels
  (``INTENSITY_LEVELS``, dense in the tails where CT clipping needs them) of
  up to ``SAMPLES_PER_CASE`` foreground voxels per case (nnU-Net samples the
  same way), plus the count, mean and std of all foreground voxels;
- the voxel fraction of every class; the number of cases and channels.

Why quantile sketches and not histograms: percentiles cannot be merged from
per-site percentiles exactly, and a histogram fine enough to place the 0.5 %
and 99.5 % points to a few HU would be a long list, which the site's egress
guard refuses (``keys.EGRESS_MAX_LIST``). Each site's sketch is read as a
piecewise-linear CDF; the federation's CDF is their mixture weighted by the
sites' counts (bounded: a count is the site's own claim, so no site weighs
more than ``WEIGHT_CAP_RATIO`` times the others' median), inverted at the
wanted level (``merged_quantile``). This is exact for one site at the sketched levels and always brackets the true
federated quantile between the smallest and largest site quantile; with the
levels packed around 0.5 % and 99.5 % the error is a fraction of the spread
between sites. The record has the same keys and list lengths whatever the
number of cases, and holds no file names.

No value in it may describe one patient: the site computes it only from at
least ``site.min_cohort`` cases (client/site_data.py refuses otherwise), and
every value is rounded to the few significant digits planning needs
(``COARSE_DIGITS``), so that interpolated percentiles of a small cohort
cannot be solved back to the cases' exact values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from . import keys
from .dataset import Case, DatasetSpec
from .labels import CODE_BITS, channel_codes, label_codes
from .reading import IMAGE, LABEL, nonzero_box, ras_axes, read_case

FINGERPRINT_FORMAT = 3
"""3: the codes of the label and channel names (common/labels.py); 2: foreground mean and std instead of exact
sums, every value coarsened (``COARSE_DIGITS``)."""
COARSE_DIGITS = {
    "spacing": 3,
    "extent": 2,
    "intensity": 4,
    "fg_voxels": 2,
    "fg_mean": 4,
    "fg_std": 3,
    "class_fraction": 3,
}
"""Significant digits each kind of value leaves the site with: enough to plan, too few to tell one patient's
value from the cohort's (a planned spacing needs 3 digits, a median extent 2)."""
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


def case_stats(case: Case, num_classes: int, rng: np.random.Generator) -> CaseStats:
    """The case read in its stored orientation (the intensity sample follows the file's voxel order),
    spacing and extent then put in RAS order."""
    data = read_case((IMAGE, LABEL), file_layout=True)({IMAGE: case.images, LABEL: case.label})
    zooms = np.asarray(data[IMAGE].meta["pixdim"][1:4], dtype=float)
    order = ras_axes(np.asarray(data[IMAGE].meta["original_affine"]))
    crop_shape = np.array([stop - start for start, stop in nonzero_box(data[IMAGE])], dtype=float)
    image, label = data[IMAGE].numpy(), data[LABEL].numpy()[0]
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


def _coarse(values: Iterable[float], kind: str) -> list[float]:
    """``values`` rounded to the significant digits ``COARSE_DIGITS`` allows this kind of value."""
    return [float(f"{float(v):.{COARSE_DIGITS[kind]}g}") for v in values]


def _chunks(name: str, values: Sequence[float]) -> dict[str, list[float]]:
    """Lists longer than the egress limit are split into numbered parts."""
    size = keys.EGRESS_MAX_LIST
    return {f"{name}_{i // size}": [float(v) for v in values[i : i + size]] for i in range(0, len(values), size)}


def _unchunk(record: dict, name: str) -> list[float]:
    out, i = [], 0
    while f"{name}_{i}" in record:
        out.extend(record[f"{name}_{i}"])
        i += 1
    return out


def record_names(channels: int, classes: int) -> frozenset[str]:
    """Every key of a site's fingerprint record (``site_fingerprint``): the egress guard lets exactly these out."""
    chunks = -(-classes // keys.EGRESS_MAX_LIST)
    channel_chunks = -(-channels // keys.EGRESS_MAX_LIST)
    per_channel = [_name(kind, c) for c in range(channels) for kind in ("intensity", "fg_voxels", "fg_mean", "fg_std")]
    return frozenset(
        [
            _name("format"),
            _name("cases"),
            _name("val_cases"),
            _name("channels"),
            _name("ct"),
            *(_name(kind, axis) for axis in AXES for kind in ("spacing", "extent")),
            *(_name(kind, i) for i in range(chunks) for kind in ("class_fraction", "label_codes")),
            *(_name("channel_codes", i) for i in range(channel_chunks)),
            *per_channel,
        ]
    )


def site_fingerprint(
    spec: DatasetSpec, case_ids: Iterable[str], seed: int = 0, val_cases: int = 0
) -> dict[str, int | float | list]:
    """The MetricRecord-ready fingerprint of the named cases: statistics only.

    ``val_cases``, the site's validation cases, is declared with it: the centre
    bounds every case count a site later reports by these two declarations.
    """
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
        _name("val_cases"): val_cases,
        _name("channels"): spec.num_channels,
        _name("ct"): [int(v) for v in spec.channel_is_ct],
    }
    for a, axis in enumerate(AXES):
        record[_name("spacing", axis)] = _coarse(np.percentile(spacing[:, a], SPACING_LEVELS), "spacing")
        record[_name("extent", axis)] = _coarse(np.percentile(extent[:, a], SPACING_LEVELS), "extent")
    record |= _chunks(_name("class_fraction"), _coarse(class_voxels / class_voxels.sum(), "class_fraction"))
    record |= _chunks(_name("label_codes"), label_codes(spec.labels))
    record |= _chunks(_name("channel_codes"), channel_codes(spec.channel_names))
    for c in range(spec.num_channels):
        pooled = np.concatenate([s.samples[c] for s in stats])
        n, total, squares = np.sum([s.moments[c] for s in stats], axis=0)
        mean = total / n if n else 0.0
        quantiles = np.percentile(pooled, INTENSITY_LEVELS) if pooled.size else np.zeros(len(INTENSITY_LEVELS))
        record[_name("intensity", c)] = _coarse(quantiles, "intensity")
        record[_name("fg_voxels", c)] = _coarse([n], "fg_voxels")[0]
        record[_name("fg_mean", c)] = _coarse([mean], "fg_mean")[0]
        record[_name("fg_std", c)] = _coarse([np.sqrt(max(squares / n - mean * mean, 0.0)) if n else 0.0], "fg_std")[0]
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
    for i, (xi, ji) in enumerate(zip(x, j, strict=True)):
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
    zero = np.zeros(len(knots))
    at = sum((s.weight * _cdf(s, knots, left=False) for s in sketches), start=zero) / total
    before = sum((s.weight * _cdf(s, knots, left=True) for s in sketches), start=zero) / total
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
    """Per RAS axis: one sketch per site (weight = cases, bounded by ``bounded_weights``)."""
    extent: list[list[Sketch]]
    intensity: list[list[Sketch]]
    """Per channel: one sketch per site (weight = foreground voxels, bounded)."""
    fg_moments: np.ndarray
    """[channel, (n, sum, sum of squares)] over the federation, each site scaled to its bounded weight."""
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


# --- checking a site's record --------------------------------------------------------

MAX_CASES = 100_000
"""More cases than any hospital's dataset: a larger count is a lie or a bug."""
SPACING_RANGE_MM = (0.01, 100.0)
EXTENT_RANGE_MM = (0.0, 5000.0)
MAX_ABS_INTENSITY = 1e7
MAX_CHANNELS = 64
FRACTION_TOLERANCE = 1e-2
"""Coarsened class fractions sum to 1 only up to their rounding."""
WEIGHT_CAP_RATIO = 3.0
"""No site weighs more than this times the median of the other sites' counts in the merge."""


@dataclass(frozen=True)
class SiteFingerprint:
    """One site's fingerprint after every value was checked for type and range."""

    cases: int
    ct: tuple[bool, ...]
    spacing: tuple[tuple[float, ...], ...]
    """Per RAS axis: quantiles at SPACING_LEVELS."""
    extent: tuple[tuple[float, ...], ...]
    intensity: tuple[tuple[float, ...], ...]
    """Per channel: quantiles at INTENSITY_LEVELS."""
    moments: np.ndarray
    """[channel, (n, sum, sum of squares)]."""
    class_fraction: tuple[float, ...]
    label_codes: tuple[int, ...]
    """The code of the name of each label value (common/labels.py)."""
    channel_codes: tuple[int, ...]


def _codes(record: dict, name: str, site: str, length: int) -> tuple[int, ...]:
    """A list of ``length`` name codes: whole numbers in [0, 2**CODE_BITS)."""
    values = _unchunk(record, name)
    if len(values) != length or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 0 <= v < 1 << CODE_BITS
        for v in values
    ):
        raise FingerprintError(f"fingerprint of site {site}: '{name}' must hold {length} name codes.")
    return tuple(int(v) for v in values)


def _get(record: dict, name: str, site: str):
    if name not in record:
        raise FingerprintError(f"fingerprint of site {site} lacks '{name}'.")
    return record[name]


def _number(record: dict, name: str, site: str, low: float = -np.inf, high: float = np.inf) -> float:
    value = _get(record, name, site)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise FingerprintError(
            f"fingerprint of site {site}: '{name}' = {value!r} is not a number in [{low:g}, {high:g}]."
        )
    return float(value)


def _count(record: dict, name: str, site: str, high: int) -> int:
    value = _number(record, name, site, 1, high)
    if value != int(value):
        raise FingerprintError(f"fingerprint of site {site}: '{name}' = {value!r} is not a whole number.")
    return int(value)


def _quantiles(
    values: object, levels: Sequence[float], name: str, site: str, low: float, high: float
) -> tuple[float, ...]:
    """A list of quantiles: one finite number per level, within [low, high], never decreasing."""
    if not isinstance(values, list) or len(values) != len(levels):
        raise FingerprintError(f"fingerprint of site {site}: '{name}' must be a list of {len(levels)} numbers.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= float(v) <= high:
            raise FingerprintError(f"fingerprint of site {site}: '{name}' holds {v!r}, outside [{low:g}, {high:g}].")
        out.append(float(v))
    if any(b < a for a, b in pairwise(out)):
        raise FingerprintError(f"fingerprint of site {site}: the quantiles '{name}' decrease.")
    return tuple(out)


def _moments(n: float, mean: float, std: float) -> list[float]:
    """(n, sum, sum of squares) of ``n`` values with this mean and std, for merging."""
    return [n, n * mean, n * (std * std + mean * mean)]


def check_site_fingerprint(record: dict, site: str) -> SiteFingerprint:
    """Parse one site's record, refusing any value of the wrong type or out of range (FingerprintError)."""
    if _count(record, _name("format"), site, 10**6) != FINGERPRINT_FORMAT:
        raise FingerprintError(
            f"site {site} sends fingerprint format {record[_name('format')]}, "
            f"the server reads {FINGERPRINT_FORMAT}; update fedseg at that site."
        )
    cases = _count(record, _name("cases"), site, MAX_CASES)
    val_cases = _number(record, _name("val_cases"), site, 0, MAX_CASES)
    if not val_cases.is_integer():
        raise FingerprintError(f"fingerprint of site {site}: '{_name('val_cases')}' is not a whole number.")
    channels = _count(record, _name("channels"), site, MAX_CHANNELS)
    ct = _get(record, _name("ct"), site)
    if not isinstance(ct, list) or len(ct) != channels or any(v not in (0, 1) for v in ct):
        raise FingerprintError(f"fingerprint of site {site}: '{_name('ct')}' must hold one 0/1 flag per channel.")
    spacing = tuple(
        _quantiles(
            _get(record, _name("spacing", a), site), SPACING_LEVELS, _name("spacing", a), site, *SPACING_RANGE_MM
        )
        for a in AXES
    )
    extent = tuple(
        _quantiles(_get(record, _name("extent", a), site), SPACING_LEVELS, _name("extent", a), site, *EXTENT_RANGE_MM)
        for a in AXES
    )
    intensity = tuple(
        _quantiles(
            _get(record, _name("intensity", c), site),
            INTENSITY_LEVELS,
            _name("intensity", c),
            site,
            -MAX_ABS_INTENSITY,
            MAX_ABS_INTENSITY,
        )
        for c in range(channels)
    )
    moments = np.array(
        [
            _moments(
                _number(record, _name("fg_voxels", c), site, 0, MAX_CASES * 1e9),
                _number(record, _name("fg_mean", c), site, -MAX_ABS_INTENSITY, MAX_ABS_INTENSITY),
                _number(record, _name("fg_std", c), site, 0, MAX_ABS_INTENSITY),
            )
            for c in range(channels)
        ]
    )
    fractions = _unchunk(record, _name("class_fraction"))
    if (
        len(fractions) < 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in fractions)
        or abs(sum(fractions) - 1) > FRACTION_TOLERANCE
    ):
        raise FingerprintError(
            f"fingerprint of site {site}: the class fractions must be numbers in [0, 1] that sum to 1."
        )
    return SiteFingerprint(
        cases,
        tuple(bool(v) for v in ct),
        spacing,
        extent,
        intensity,
        moments,
        tuple(float(v) for v in fractions),
        _codes(record, _name("label_codes"), site, len(fractions)),
        _codes(record, _name("channel_codes"), site, channels),
    )


def bounded_weights(counts: Sequence[float]) -> list[float]:
    """Each site's count, capped at WEIGHT_CAP_RATIO times the median of the other sites' counts.

    Counts are the sites' own claims: uncapped, one site claiming a billion
    cases would decide the plan alone. Honest federations whose sites differ
    by less than the ratio are merged exactly as the pooled data would be.
    """
    if len(counts) < 2:
        return [float(c) for c in counts]
    return [
        min(float(c), WEIGHT_CAP_RATIO * float(np.median([*counts[:k], *counts[k + 1 :]])))
        for k, c in enumerate(counts)
    ]


def merge_fingerprints(records: dict[str, dict]) -> FederatedFingerprint:
    """Merge site fingerprints (site name -> record); sites must agree on format, channels and classes.

    Every record is checked first (``check_site_fingerprint``); sites are
    weighted by their case (or foreground voxel) counts, bounded by
    ``bounded_weights``.
    """
    if not records:
        raise FingerprintError("no site fingerprint to merge.")
    checked = {site: check_site_fingerprint(rec, site) for site, rec in records.items()}
    first_site, first = next(iter(checked.items()))
    for site, fp in checked.items():
        if fp.ct != first.ct:
            raise FingerprintError(
                f"site {site} declares different channels (or CT flags) than site "
                f"{first_site}; every site's dataset.json must list the same channels."
            )
        if len(fp.class_fraction) != len(first.class_fraction):
            raise FingerprintError(
                f"site {site} declares {len(fp.class_fraction)} classes, site {first_site} "
                f"{len(first.class_fraction)}; every site must label the same classes."
            )
    sites = list(checked.values())
    channels = len(first.ct)
    case_weights = bounded_weights([fp.cases for fp in sites])
    spacing = [
        [Sketch(SPACING_LEVELS, fp.spacing[a], w) for fp, w in zip(sites, case_weights, strict=True)] for a in range(3)
    ]
    extent = [
        [Sketch(SPACING_LEVELS, fp.extent[a], w) for fp, w in zip(sites, case_weights, strict=True)] for a in range(3)
    ]
    intensity, moments = [], np.zeros((channels, 3))
    for c in range(channels):
        voxel_weights = bounded_weights([fp.moments[c, 0] for fp in sites])
        intensity.append(
            [Sketch(INTENSITY_LEVELS, fp.intensity[c], w) for fp, w in zip(sites, voxel_weights, strict=True)]
        )
        for fp, w in zip(sites, voxel_weights, strict=True):
            if fp.moments[c, 0] > 0:
                moments[c] += fp.moments[c] * (w / fp.moments[c, 0])
    fractions = np.sum([np.asarray(fp.class_fraction) * w for fp, w in zip(sites, case_weights, strict=True)], axis=0)
    return FederatedFingerprint(
        num_cases=sum(fp.cases for fp in sites),
        num_channels=channels,
        channel_is_ct=list(first.ct),
        spacing=spacing,
        extent=extent,
        intensity=intensity,
        fg_moments=moments,
        class_fraction=[float(v) for v in fractions / sum(case_weights)],
        sites=list(records),
    )
