"""Synthetic multi-site segmentation data with controllable scanner shift.

Federated segmentation is only interesting when sites disagree: different
contrast curves, bias fields, noise, voxel spacing, orientation and intensity
units. Real multi-site data cannot be shipped with the project, so this module
draws small 3D volumes ("organ" with a few "lesions") and passes them through a
per-site *scanner signature* that reproduces those disagreements in a
controlled, reproducible way.

Each site is written as real NIfTI files in the nnU-Net v2 raw layout, so the
very same data pipeline that reads a hospital's data reads the synthetic one::

    <out_dir>/Dataset101_Site1/
        dataset.json
        imagesTr/site_1_000_0000.nii.gz
        labelsTr/site_1_000.nii.gz
        .complete            written last; marks a finished, reusable dataset

The ground truth is drawn in a canonical RAS voxel grid; the scanner only
changes intensities and the way the grid is stored (affine, axis flips). The
anatomy of a case depends on the seed alone, never on the signature, so two
federations that differ only in ``strength`` hold the same patients.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from common.dataset import DATASET_JSON, IMAGES_DIR, LABELS_DIR, TEST_IMAGES_DIR, TEST_LABELS_DIR

logger = logging.getLogger("fedseg.sim")

# --------------------------------------------------------------------------
# Layout (nnU-Net v2 raw format)
# --------------------------------------------------------------------------
TEST_STREAM = 1_000_000
"""Test case j is drawn from the seed (seed, TEST_STREAM + j): never the same patient as a training case."""
COMPLETE_MARKER = ".complete"
FILE_ENDING = ".nii.gz"
CHANNEL_SUFFIX = "_0000"
CHANNEL_NAMES = {"0": "MR"}
"""One MR contrast at every site: MR intensities are uncalibrated, so each scanner's
units, offset and contrast curve may differ, and the plan normalizes per case
(nnU-Net's rule for non-CT); a CT federation would share Hounsfield units."""
LABELS = {"background": 0, "lesion": 1}
LESION_LABEL = LABELS["lesion"]
MIN_DATASET_ID = 1
MAX_DATASET_ID = 999
DEFAULT_DATASET_ID = 101
DEFAULT_SHAPE = (48, 48, 32)
SITE_NAME_TEMPLATE = "site-{index}"
NIFTI_XFORM_CODE = 1  # NIFTI_XFORM_SCANNER_ANAT: the affine is the scanner's world
SPATIAL_UNITS = "mm"
# Bump when the drawing procedure changes, so cached datasets are redrawn.
GENERATOR_VERSION = 2

# --------------------------------------------------------------------------
# Anatomy, in the canonical [0, 1] tissue scale
# --------------------------------------------------------------------------
BACKGROUND_LEVEL = 0.1
TISSUE_LEVEL = 0.45
LESION_LEVEL = 0.75
ORGAN_SEMI_AXIS_FRACTION = (0.32, 0.42)  # of the volume's extent, per axis
ORGAN_CENTER_JITTER_FRACTION = 0.05  # of the volume's extent, per axis
ORGAN_EDGE_SOFTNESS = 0.04  # sigmoid width in units of the normalised radius
ORGAN_TEXTURE_AMPLITUDE = 0.04
ORGAN_TEXTURE_WAVES = 3
ORGAN_TEXTURE_CYCLES = (0.5, 1.5)  # spatial frequency, cycles per volume
MAX_LESIONS = 3
LESION_RADIUS_VOXELS = (2.0, 5.0)
# The first lesion is never tiny, so every case has a real target to find.
FIRST_LESION_MIN_RADIUS_VOXELS = 3.5
LESION_CENTER_MAX_RHO = 0.55  # lesion centres stay in the inner part of the organ
LESION_EDGE_SOFTNESS = 0.12
MIN_LESION_VOXELS = 20
MAX_FOREGROUND_FRACTION = 0.05  # keeps the class imbalance real (aim: 0.5-3 %)
MAX_LESION_ATTEMPTS = 50

# --------------------------------------------------------------------------
# Scanner model
# --------------------------------------------------------------------------
BIAS_FIELD_DEGREE = 2  # low-order polynomial: smooth, like a coil profile
MIN_BIAS_GAIN = 0.05  # the multiplicative field never flips or zeroes the signal
MAX_BIAS_STRENGTH = 0.9
NEUTRAL_NOISE_STD = 0.15  # every scanner has some noise, even a "neutral" one
CANONICAL_AXCODES = ("R", "A", "S")
SPATIAL_DIMS = 3

# Sites beyond the archetype table reuse an archetype, nudged along additive
# low-discrepancy sequences (one irrational step per parameter) so that no two
# sites of a large federation coincide.
GAMMA_JITTER_LOG = 0.25
BIAS_JITTER = 0.1
NOISE_JITTER_LOG = 0.3
SPACING_JITTER_LOG = 0.2
SCALE_JITTER_LOG = 0.5
JITTER_STEPS = {
    "gamma": (math.sqrt(5.0) - 1.0) / 2.0,
    "bias": math.sqrt(2.0) - 1.0,
    "noise": math.sqrt(3.0) - 1.0,
    "spacing": math.sqrt(7.0) - 2.0,
    "scale": math.sqrt(11.0) - 3.0,
}
JITTER_PHASE = 0.5


def _orientation_transform(axcodes: str) -> np.ndarray:
    """nibabel orientation transform from the canonical RAS grid to ``axcodes``."""
    allowed = "one of R/L, one of A/P and one of S/I, e.g. 'RAS' or 'LPS'"
    if len(axcodes) != SPATIAL_DIMS:
        raise ValueError(f"orientation must be 3 axis codes ({allowed}), got {axcodes!r}")
    try:
        target = orientations.axcodes2ornt(tuple(axcodes))
    except ValueError as error:
        raise ValueError(f"orientation {axcodes!r} is not valid; expected {allowed}") from error
    if np.isnan(target).any() or len(set(target[:, 0])) != SPATIAL_DIMS:
        raise ValueError(f"orientation {axcodes!r} is not valid; expected {allowed}")
    return orientations.ornt_transform(orientations.axcodes2ornt(CANONICAL_AXCODES), target)


@dataclass(frozen=True)
class ScannerSignature:
    """How one site's scanner distorts intensities and geometry.

    Parameters
    ----------
    gamma
        Contrast curve applied to [0, 1]-scaled intensities (``x ** gamma``).
        Unlike scale and offset, a per-case z-score cannot undo it.
    bias_strength
        Amplitude of a smooth multiplicative bias field, in [0, 1); 0 = none.
    noise_std
        Additive Gaussian noise relative to the lesion/tissue contrast after
        the gamma curve, i.e. the inverse contrast-to-noise ratio.
    spacing
        Voxel spacing in mm written into the affine.
    orientation
        Axis codes of the written affine, e.g. ``"RAS"`` or ``"LPS"``. The data
        are flipped (and the affine adjusted) so world coordinates stay put.
    intensity_scale, intensity_offset
        Scanner units: final intensities are ``x * scale + offset``.
    """

    gamma: float
    bias_strength: float
    noise_std: float
    spacing: tuple[float, float, float]
    orientation: str
    intensity_scale: float
    intensity_offset: float

    def __post_init__(self) -> None:
        spacing = tuple(float(v) for v in self.spacing)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "orientation", str(self.orientation).upper())
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")
        if not 0 <= self.bias_strength < 1:
            raise ValueError(f"bias_strength must be in [0, 1), got {self.bias_strength!r}")
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")
        if len(spacing) != SPATIAL_DIMS or not all(v > 0 for v in spacing):
            raise ValueError(f"spacing must be 3 positive values in mm, got {self.spacing!r}")
        if not self.intensity_scale > 0:
            raise ValueError(f"intensity_scale must be > 0, got {self.intensity_scale!r}")
        _orientation_transform(self.orientation)


NEUTRAL_SIGNATURE = ScannerSignature(
    gamma=1.0,
    bias_strength=0.0,
    noise_std=NEUTRAL_NOISE_STD,
    spacing=(1.0, 1.0, 1.0),
    orientation="RAS",
    intensity_scale=1.0,
    intensity_offset=0.0,
)

# Full-strength scanner archetypes: MR scanners whose reconstructions use
# different units and offsets, contrast curves, bias fields, noise, voxel
# spacing and storage orientation (LPS, as DICOM converters write, or RAS).
# Neighbouring sites differ in every field.
SITE_ARCHETYPES: tuple[ScannerSignature, ...] = tuple(
    ScannerSignature(*fields)
    for fields in (
        # gamma, bias_strength, noise_std, spacing (mm), orientation, intensity_scale, intensity_offset
        (0.6, 0.15, 0.12, (0.8, 0.8, 2.5), "LPS", 1200.0, -1000.0),
        (1.8, 0.35, 0.25, (1.0, 1.0, 1.0), "RAS", 2500.0, 0.0),
        (1.2, 0.25, 0.4, (0.6, 0.6, 4.0), "LPS", 600.0, 50.0),
        (0.8, 0.45, 0.08, (1.2, 1.2, 1.5), "RAS", 4095.0, 0.0),
        (2.4, 0.1, 0.3, (0.9, 0.9, 3.0), "LPS", 1500.0, -1024.0),
    )
)


# ==========================================================================
# Scanner signatures
# ==========================================================================
def default_signatures(n_sites: int, strength: float = 1.0) -> list[ScannerSignature]:
    """Return one deterministic scanner per site, shifted by ``strength``.

    ``strength`` interpolates every site from the same neutral scanner (0) to
    its full archetype (1), so a sweep over strength measures how much domain
    shift a strategy tolerates. Values above 1 extrapolate.

    Parameters
    ----------
    n_sites
        Number of sites, >= 1. Any number works: sites beyond the archetype
        table are jittered copies, all distinct.
    strength
        Domain-shift strength, >= 0.
    """
    if int(n_sites) != n_sites or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0 (0 = identical scanners), got {strength!r}")
    return [_interpolate(_site_target(i), strength) for i in range(int(n_sites))]


def _site_target(site_index: int) -> ScannerSignature:
    """Full-strength scanner of a site: its archetype, jittered after the first cycle."""
    cycle, archetype_index = divmod(site_index, len(SITE_ARCHETYPES))
    archetype = SITE_ARCHETYPES[archetype_index]
    if cycle == 0:
        return archetype

    def jitter(name: str) -> float:
        """Low-discrepancy value in [-1, 1) for this cycle and parameter."""
        return 2.0 * ((JITTER_PHASE + cycle * JITTER_STEPS[name]) % 1.0) - 1.0

    in_plane = math.exp(SPACING_JITTER_LOG * jitter("spacing"))
    sx, sy, sz = archetype.spacing
    return replace(
        archetype,
        gamma=archetype.gamma * math.exp(GAMMA_JITTER_LOG * jitter("gamma")),
        bias_strength=min(max(archetype.bias_strength + BIAS_JITTER * jitter("bias"), 0.0), MAX_BIAS_STRENGTH),
        noise_std=archetype.noise_std * math.exp(NOISE_JITTER_LOG * jitter("noise")),
        spacing=(sx * in_plane, sy * in_plane, sz),
        intensity_scale=archetype.intensity_scale * math.exp(SCALE_JITTER_LOG * jitter("scale")),
    )


def _interpolate(target: ScannerSignature, strength: float) -> ScannerSignature:
    """Move from the neutral scanner towards ``target``.

    Multiplicative quantities (gamma, spacing, scale) are interpolated in log
    space so they stay positive for any strength.
    """
    neutral = NEUTRAL_SIGNATURE

    def geometric(a: float, b: float) -> float:
        return a * (b / a) ** strength

    return ScannerSignature(
        gamma=geometric(neutral.gamma, target.gamma),
        bias_strength=min(strength * target.bias_strength, MAX_BIAS_STRENGTH),
        noise_std=max(neutral.noise_std + strength * (target.noise_std - neutral.noise_std), 0.0),
        spacing=(
            geometric(neutral.spacing[0], target.spacing[0]),
            geometric(neutral.spacing[1], target.spacing[1]),
            geometric(neutral.spacing[2], target.spacing[2]),
        ),
        orientation=target.orientation if strength > 0 else neutral.orientation,
        intensity_scale=geometric(neutral.intensity_scale, target.intensity_scale),
        intensity_offset=neutral.intensity_offset + strength * (target.intensity_offset - neutral.intensity_offset),
    )


# ==========================================================================
# Anatomy: canonical tissue image and ground truth
# ==========================================================================
def _voxel_grid(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel index coordinates, shape (3, X, Y, Z)."""
    return np.indices(shape, dtype=np.float64)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random orthogonal 3x3 matrix, so lesions are not axis-aligned."""
    q, r = np.linalg.qr(rng.standard_normal((SPATIAL_DIMS, SPATIAL_DIMS)))
    return q * np.sign(np.diag(r))


def _ellipsoid_radius(
    grid: np.ndarray, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray | None = None
) -> np.ndarray:
    """Normalised ellipsoid radius per voxel: < 1 inside, 1 on the surface."""
    offsets = grid - center[:, None, None, None]
    if rotation is not None:
        offsets = np.einsum("ij,j...->i...", rotation, offsets)
    scaled = offsets / radii[:, None, None, None]
    return np.sqrt(np.sum(scaled * scaled, axis=0))


def _soft_inside(radius: np.ndarray, softness: float) -> np.ndarray:
    """Smooth 0..1 membership with a sigmoid edge, as partial-volume blur would give."""
    return 0.5 * (1.0 + np.tanh((1.0 - radius) / (2.0 * softness)))


def _organ(
    grid: np.ndarray, shape: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw the organ: returns (radius map, soft weight, centre, semi-axes)."""
    semi_axes = shape * rng.uniform(*ORGAN_SEMI_AXIS_FRACTION, size=SPATIAL_DIMS)
    jitter = shape * ORGAN_CENTER_JITTER_FRACTION
    center = (shape - 1) / 2.0 + rng.uniform(-jitter, jitter)
    radius = _ellipsoid_radius(grid, center, semi_axes)
    return radius, _soft_inside(radius, ORGAN_EDGE_SOFTNESS), center, semi_axes


def _organ_texture(grid: np.ndarray, shape: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth low-frequency tissue variation, so the organ is not a flat plateau."""
    texture = np.zeros(grid.shape[1:])
    for _ in range(ORGAN_TEXTURE_WAVES):
        direction = rng.standard_normal(SPATIAL_DIMS)
        direction /= np.linalg.norm(direction)
        cycles = rng.uniform(*ORGAN_TEXTURE_CYCLES)
        wave_vector = 2.0 * np.pi * cycles * direction / shape
        phase = rng.uniform(0.0, 2.0 * np.pi)
        texture += np.cos(np.einsum("i,i...->...", wave_vector, grid) + phase)
    return ORGAN_TEXTURE_AMPLITUDE * texture / ORGAN_TEXTURE_WAVES


def _draw_lesions(
    grid: np.ndarray, organ_center: np.ndarray, organ_axes: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One attempt at 1..MAX_LESIONS rotated ellipsoids inside the organ.

    Returns the hard lesion mask and a soft weight for the intensity image.
    """
    mask = np.zeros(grid.shape[1:], dtype=bool)
    weight = np.zeros(grid.shape[1:])
    n_lesions = int(rng.integers(1, MAX_LESIONS + 1))
    for index in range(n_lesions):
        low = FIRST_LESION_MIN_RADIUS_VOXELS if index == 0 else LESION_RADIUS_VOXELS[0]
        radii = rng.uniform(low, LESION_RADIUS_VOXELS[1], size=SPATIAL_DIMS)
        direction = rng.standard_normal(SPATIAL_DIMS)
        direction /= np.linalg.norm(direction)
        rho = LESION_CENTER_MAX_RHO * rng.uniform() ** (1.0 / SPATIAL_DIMS)
        center = organ_center + organ_axes * direction * rho
        radius = _ellipsoid_radius(grid, center, radii, _random_rotation(rng))
        mask |= radius <= 1.0
        weight = np.maximum(weight, _soft_inside(radius, LESION_EDGE_SOFTNESS))
    return mask, weight


def _draw_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one case in the canonical grid: (tissue image in [0, 1], uint8 label).

    Lesions are redrawn until the case has a findable lesion and the foreground
    stays a small minority, so every case satisfies the class-imbalance contract.
    """
    grid = _voxel_grid(shape)
    extent = np.asarray(shape, dtype=np.float64)
    organ_radius, organ_weight, organ_center, organ_axes = _organ(grid, extent, rng)
    texture = _organ_texture(grid, extent, rng)
    organ_mask = organ_radius < 1.0
    n_voxels = organ_mask.size
    for _ in range(MAX_LESION_ATTEMPTS):
        lesion_mask, lesion_weight = _draw_lesions(grid, organ_center, organ_axes, rng)
        label = lesion_mask & organ_mask
        n_lesion = int(label.sum())
        if n_lesion >= MIN_LESION_VOXELS and n_lesion / n_voxels <= MAX_FOREGROUND_FRACTION:
            break
    else:
        raise ValueError(
            f"could not place lesions of >= {MIN_LESION_VOXELS} voxels covering <= "
            f"{MAX_FOREGROUND_FRACTION:.0%} of a volume of shape {tuple(shape)}; "
            f"use a larger shape (default {DEFAULT_SHAPE})"
        )
    tissue = (
        BACKGROUND_LEVEL
        + (TISSUE_LEVEL - BACKGROUND_LEVEL + texture) * organ_weight
        + (LESION_LEVEL - TISSUE_LEVEL) * lesion_weight * organ_weight
    )
    return np.clip(tissue, 0.0, 1.0), label.astype(np.uint8)


# ==========================================================================
# Scanner: intensities and geometry
# ==========================================================================
def _bias_field(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Random smooth field in [-1, 1]: a low-order polynomial of the coordinates."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    coords = np.meshgrid(*axes, indexing="ij")
    field = np.zeros(shape)
    for px in range(BIAS_FIELD_DEGREE + 1):
        for py in range(BIAS_FIELD_DEGREE + 1 - px):
            for pz in range(BIAS_FIELD_DEGREE + 1 - px - py):
                if px + py + pz == 0:
                    continue
                term = coords[0] ** px * coords[1] ** py * coords[2] ** pz
                field += rng.standard_normal() * term
    peak = np.max(np.abs(field))
    return field / peak if peak > 0 else field


def _apply_signature(tissue: np.ndarray, signature: ScannerSignature, rng: np.random.Generator) -> np.ndarray:
    """Turn a canonical tissue image into this scanner's float32 intensities."""
    image = tissue**signature.gamma
    gain = 1.0 + signature.bias_strength * _bias_field(tissue.shape, rng)
    image = image * np.maximum(gain, MIN_BIAS_GAIN)
    contrast = abs(LESION_LEVEL**signature.gamma - TISSUE_LEVEL**signature.gamma)
    image = image + rng.normal(0.0, signature.noise_std * contrast, size=tissue.shape)
    image = image * signature.intensity_scale + signature.intensity_offset
    return image.astype(np.float32)


def _canonical_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine with the given spacing, centred on the world origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:SPATIAL_DIMS, SPATIAL_DIMS] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return affine


def _reorient(arrays: list[np.ndarray], affine: np.ndarray, axcodes: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Store canonical arrays in ``axcodes`` order without moving them in world space."""
    transform = _orientation_transform(axcodes)
    in_shape = arrays[0].shape
    moved = [np.ascontiguousarray(orientations.apply_orientation(a, transform)) for a in arrays]
    return moved, affine @ orientations.inv_ornt_aff(transform, in_shape)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write with both qform and sform set, as scanners and converters do."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=NIFTI_XFORM_CODE)
    image.set_sform(affine, code=NIFTI_XFORM_CODE)
    image.header.set_xyzt_units(xyz=SPATIAL_UNITS)
    nib.save(image, str(path))


# ==========================================================================
# Naming and on-disk layout
# ==========================================================================
def _camel(site_name: str) -> str:
    """'site-1' -> 'Site1': the nnU-Net dataset name part."""
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", site_name) if p]
    if not parts:
        raise ValueError(f"site_name must contain letters or digits, got {site_name!r}")
    return "".join(p[0].upper() + p[1:] for p in parts)


def _case_ids(site_name: str, n_cases: int) -> list[str]:
    """Case ids restricted to [A-Za-z0-9_], safe for nnU-Net and file systems."""
    return [re.sub(r"[^A-Za-z0-9_]", "_", f"{site_name}_{i:03d}") for i in range(n_cases)]


def _dataset_dir(out_dir: Path, site_name: str, dataset_id: int) -> Path:
    return Path(out_dir) / f"Dataset{dataset_id:03d}_{_camel(site_name)}"


def _case_paths(dataset_dir: Path, case_id: str, test: bool = False) -> tuple[Path, Path]:
    """(image path, label path) of one training case, or of one test case."""
    images, labels = (TEST_IMAGES_DIR, TEST_LABELS_DIR) if test else (IMAGES_DIR, LABELS_DIR)
    return (
        dataset_dir / images / f"{case_id}{CHANNEL_SUFFIX}{FILE_ENDING}",
        dataset_dir / labels / f"{case_id}{FILE_ENDING}",
    )


def _test_ids(site_name: str, n_test: int) -> list[str]:
    return [f"{c}_test" for c in _case_ids(site_name, n_test)]


def _dataset_json(site_name: str, n_cases: int) -> dict:
    return {
        "channel_names": dict(CHANNEL_NAMES),
        "labels": dict(LABELS),
        "numTraining": n_cases,
        "file_ending": FILE_ENDING,
        "name": site_name,
    }


def _provenance(
    site_name: str,
    n_cases: int,
    shape: tuple[int, int, int],
    signature: ScannerSignature,
    seed: int,
    dataset_id: int,
    n_test: int = 0,
) -> dict:
    """Everything that determines a dataset's contents; stored in the marker.

    A cached dataset is reused only when this matches, so changing e.g. the
    shift strength never silently reuses data drawn with the old one.
    """
    return json.loads(
        json.dumps(
            {
                "generator_version": GENERATOR_VERSION,
                "site_name": site_name,
                "n_cases": n_cases,
                "shape": list(shape),
                "signature": asdict(signature),
                "seed": seed,
                "dataset_id": dataset_id,
                **({"n_test": n_test} if n_test else {}),
            }
        )
    )


def _is_complete(dataset_dir: Path, provenance: dict) -> bool:
    """True when a finished dataset drawn with exactly these arguments is on disk."""
    try:
        marker = json.loads((dataset_dir / COMPLETE_MARKER).read_text())
        meta = json.loads((dataset_dir / DATASET_JSON).read_text())
    except (OSError, ValueError):
        return False
    expected_json = _dataset_json(provenance["site_name"], provenance["n_cases"])
    if marker != provenance or meta != expected_json:
        return False
    case_ids = _case_ids(provenance["site_name"], provenance["n_cases"])
    test_ids = _test_ids(provenance["site_name"], provenance.get("n_test", 0))
    return all(p.is_file() for c in case_ids for p in _case_paths(dataset_dir, c)) and all(
        p.is_file() for c in test_ids for p in _case_paths(dataset_dir, c, test=True)
    )


def _clear_dataset(dataset_dir: Path) -> None:
    """Remove what a previous (possibly interrupted) run wrote; marker first."""
    (dataset_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    (dataset_dir / DATASET_JSON).unlink(missing_ok=True)
    for sub in (IMAGES_DIR, LABELS_DIR, TEST_IMAGES_DIR, TEST_LABELS_DIR):
        if (dataset_dir / sub).exists():
            shutil.rmtree(dataset_dir / sub)


def _spatial_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as three positive ints (each value truncated to an int first)."""
    ints = tuple(int(n) for n in shape)
    if len(ints) != SPATIAL_DIMS or not all(n > 0 for n in ints):
        raise ValueError(f"shape must be 3 positive integers, got {ints!r}")
    return ints[0], ints[1], ints[2]


def _validate_site_args(n_cases: int, dataset_id: int) -> None:
    if int(n_cases) != n_cases or n_cases < 1:
        raise ValueError(f"n_cases must be an integer >= 1, got {n_cases!r}")
    if not MIN_DATASET_ID <= dataset_id <= MAX_DATASET_ID:
        raise ValueError(
            f"dataset_id must be in [{MIN_DATASET_ID}, {MAX_DATASET_ID}] (nnU-Net uses 3 digits), got {dataset_id!r}"
        )


# ==========================================================================
# Public entry points
# ==========================================================================
def generate_site(
    out_dir: Path,
    site_name: str,
    n_cases: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    signature: ScannerSignature | None = None,
    seed: int = 0,
    dataset_id: int = DEFAULT_DATASET_ID,
    n_test: int = 0,
) -> Path:
    """Write one site's dataset in the nnU-Net v2 raw layout; return its folder.

    Always (re)writes: any earlier content of the dataset folder's layout is
    removed first, and the ``.complete`` marker is written last, so an
    interrupted run is recognisably incomplete. Case ``i`` is drawn from the
    seed ``(seed, i)``: the same arguments give identical arrays.

    Parameters
    ----------
    out_dir
        Parent folder; the dataset goes to ``Dataset{id:03d}_{SiteNameCamel}``.
    site_name
        Configured site name, e.g. ``"site-1"``; used for case ids.
    n_cases
        Number of training cases, >= 1.
    shape
        Canonical volume shape (before any axis permutation of the orientation).
    signature
        Scanner of this site; ``None`` gives the neutral scanner.
    seed
        Anatomy and scanner-noise seed.
    dataset_id
        nnU-Net dataset id, 1..999.
    n_test
        Labelled test cases in imagesTs/labelsTs (other patients of the same scanner).
    """
    _validate_site_args(n_cases, dataset_id)
    shape = _spatial_shape(shape)
    signature = NEUTRAL_SIGNATURE if signature is None else signature
    dataset_dir = _dataset_dir(out_dir, site_name, dataset_id)
    _clear_dataset(dataset_dir)
    (dataset_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (dataset_dir / LABELS_DIR).mkdir(parents=True, exist_ok=True)

    affine = _canonical_affine(shape, signature.spacing)
    cases = [(case_id, index, False) for index, case_id in enumerate(_case_ids(site_name, n_cases))]
    cases += [(case_id, TEST_STREAM + j, True) for j, case_id in enumerate(_test_ids(site_name, n_test))]
    for case_id, stream, test in cases:
        anatomy_seq, scanner_seq = np.random.SeedSequence([seed, stream]).spawn(2)
        tissue, label = _draw_case(shape, np.random.default_rng(anatomy_seq))
        image = _apply_signature(tissue, signature, np.random.default_rng(scanner_seq))
        (image, label), stored_affine = _reorient([image, label], affine, signature.orientation)
        image_path, label_path = _case_paths(dataset_dir, case_id, test)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        _save_nifti(image, stored_affine, image_path)
        _save_nifti(label, stored_affine, label_path)

    meta = _dataset_json(site_name, n_cases)
    (dataset_dir / DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    provenance = _provenance(site_name, n_cases, shape, signature, seed, dataset_id, n_test)
    (dataset_dir / COMPLETE_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("wrote %d synthetic cases for %s to %s", n_cases, site_name, dataset_dir)
    return dataset_dir


def _site_seed(seed: int, site_index: int) -> int:
    """Independent per-site seed, so sites hold different patients."""
    return int(np.random.SeedSequence([seed, site_index]).generate_state(1)[0])


def generate_federation(
    out_dir: Path,
    n_sites: int = 3,
    n_cases: int = 8,
    shape: Sequence[int] = DEFAULT_SHAPE,
    strength: float = 1.0,
    seed: int = 0,
    n_test: int = 0,
) -> dict[str, Path]:
    """Write (or reuse) one dataset per site; return ``{site_name: dataset_dir}``.

    Idempotent: a site whose folder holds a finished dataset drawn with the same
    arguments is left untouched, so repeated simulation runs start instantly;
    an interrupted or differently-parametrised site is redrawn.

    Parameters
    ----------
    out_dir
        Parent folder of all site datasets.
    n_sites
        Number of sites, named ``site-1`` .. ``site-N`` with dataset ids 101...
    n_cases
        Training cases per site.
    shape
        Canonical volume shape.
    strength
        Domain-shift strength passed to :func:`default_signatures`.
    seed
        Federation seed; each site derives its own from it.
    n_test
        Labelled test cases per site (imagesTs/labelsTs).
    """
    signatures = default_signatures(n_sites, strength)
    if DEFAULT_DATASET_ID + len(signatures) - 1 > MAX_DATASET_ID:
        raise ValueError(
            f"n_sites={n_sites} needs dataset ids beyond {MAX_DATASET_ID}; "
            f"use at most {MAX_DATASET_ID - DEFAULT_DATASET_ID + 1} sites"
        )
    shape = _spatial_shape(shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sites: dict[str, Path] = {}
    for index, signature in enumerate(signatures):
        site_name = SITE_NAME_TEMPLATE.format(index=index + 1)
        dataset_id = DEFAULT_DATASET_ID + index
        site_seed = _site_seed(seed, index)
        dataset_dir = _dataset_dir(out_dir, site_name, dataset_id)
        provenance = _provenance(site_name, n_cases, shape, signature, site_seed, dataset_id, n_test)
        if _is_complete(dataset_dir, provenance):
            logger.info("reusing complete synthetic dataset %s", dataset_dir)
        else:
            generate_site(out_dir, site_name, n_cases, shape, signature, site_seed, dataset_id, n_test)
        sites[site_name] = dataset_dir
    return sites
