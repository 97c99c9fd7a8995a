"""Tests of the synthetic multi-site generator, read back from disk with nibabel.

The simulation relies on these files as if they came from hospitals, so the
tests check the on-disk contract (nnU-Net layout, NIfTI geometry, labels) and
that the scanner shift is real and survives per-case normalisation.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.reading import load_nifti
from simulations.synthetic import (
    ScannerSignature,
    default_signatures,
    generate_federation,
    generate_site,
)

N_SITES = 3
N_CASES = 4
SHAPE = (48, 48, 32)
MIN_LESION_VOXELS = 20
MAX_FOREGROUND_FRACTION = 0.1
# Per-case z-scoring must leave a clear gap between site 1 and site 2.
MIN_SKEWNESS_GAP = 0.2
OLD_MTIME_NS = 1_000_000_000 * 10**9
EXPECTED_JSON_KEYS = {"channel_names", "labels", "numTraining", "file_ending", "name"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("federation")
    return generate_federation(out, n_sites=N_SITES, n_cases=N_CASES, shape=SHAPE, seed=0)


def _cases(dataset_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of a dataset, matched by case id."""
    labels = sorted((dataset_dir / "labelsTr").glob("*.nii.gz"))
    return [(dataset_dir / "imagesTr" / p.name.replace(".nii.gz", "_0000.nii.gz"), p) for p in labels]


def _arrays(dataset_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (np.asarray(load_nifti(image).dataobj), np.asarray(load_nifti(label).dataobj))
        for image, label in _cases(dataset_dir)
    ]


def _zscore(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float64)
    return (image - image.mean()) / image.std()


def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _age_files(root: Path) -> None:
    """Backdate every file so a rewrite is visible whatever the clock resolution."""
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))


# --------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------
def test_layout_and_dataset_json(federation: dict[str, Path]) -> None:
    assert list(federation) == ["site-1", "site-2", "site-3"]
    for index, dataset_dir in enumerate(federation.values()):
        assert dataset_dir.name == f"Dataset{101 + index:03d}_Site{index + 1}"
        assert (dataset_dir / ".complete").is_file()
        meta = json.loads((dataset_dir / "dataset.json").read_text())
        assert set(meta) == EXPECTED_JSON_KEYS
        assert meta["channel_names"] == {"0": "MR"}
        assert meta["labels"] == {"background": 0, "lesion": 1}
        assert meta["numTraining"] == N_CASES
        assert meta["file_ending"] == ".nii.gz"
        assert meta["name"]
        images = sorted(p.name for p in (dataset_dir / "imagesTr").iterdir())
        labels = sorted(p.name for p in (dataset_dir / "labelsTr").iterdir())
        case_ids = [f"site_{index + 1}_{i:03d}" for i in range(N_CASES)]
        assert labels == [f"{c}.nii.gz" for c in case_ids]
        assert images == [f"{c}_0000.nii.gz" for c in case_ids]
        assert all(re.fullmatch(r"[A-Za-z0-9_]+", c) for c in case_ids)


def test_case_ids_are_sanitised(tmp_path: Path) -> None:
    dataset_dir = generate_site(tmp_path, "St. Mary's-ICU", n_cases=1, dataset_id=7)
    assert dataset_dir.name == "Dataset007_StMarySICU"
    names = [p.name for p in (dataset_dir / "labelsTr").iterdir()]
    assert names == ["St__Mary_s_ICU_000.nii.gz"]


# --------------------------------------------------------------------------
# NIfTI contents
# --------------------------------------------------------------------------
def test_images_and_labels_are_consistent(federation: dict[str, Path]) -> None:
    for dataset_dir in federation.values():
        for image_path, label_path in _cases(dataset_dir):
            image, label = load_nifti(image_path), load_nifti(label_path)
            assert image.shape == label.shape
            assert np.allclose(image.affine, label.affine)
            assert image.header.get_data_dtype() == np.float32
            assert label.header.get_data_dtype() == np.uint8
            for img in (image, label):
                assert int(img.header["qform_code"]) == 1
                assert int(img.header["sform_code"]) == 1
            labels = np.asarray(label.dataobj)
            assert set(np.unique(labels).tolist()) <= {0, 1}
            n_lesion = int((labels == 1).sum())
            assert n_lesion >= MIN_LESION_VOXELS
            assert 0 < n_lesion / labels.size < MAX_FOREGROUND_FRACTION
            assert np.isfinite(np.asarray(image.dataobj)).all()


def test_lesions_are_brighter_than_their_surroundings(federation: dict[str, Path]) -> None:
    """The task must be learnable: lesions have a distinct intensity at every site."""
    for dataset_dir in federation.values():
        for image, label in _arrays(dataset_dir):
            assert image[label == 1].mean() > image[label == 0].mean()


def test_geometry_matches_signature(federation: dict[str, Path]) -> None:
    signatures = default_signatures(N_SITES)
    for signature, dataset_dir in zip(signatures, federation.values(), strict=True):
        image_path, _ = _cases(dataset_dir)[0]
        image = load_nifti(image_path)
        assert nib.aff2axcodes(image.affine) == tuple(signature.orientation)
        assert np.allclose(image.header.get_zooms(), signature.spacing)
    assert {s.orientation for s in signatures} == {"RAS", "LPS"}
    assert len({s.spacing for s in signatures}) == N_SITES


def test_orientation_keeps_world_coordinates(tmp_path: Path) -> None:
    """An LPS site stores the same anatomy at the same world positions as RAS."""
    ras = replace(default_signatures(1, strength=0.0)[0], orientation="RAS", noise_std=0.0)
    lps = replace(ras, orientation="LPS")
    ras_dir = generate_site(tmp_path / "ras", "a", 1, SHAPE, ras, seed=3)
    lps_dir = generate_site(tmp_path / "lps", "a", 1, SHAPE, lps, seed=3)
    ((ras_img, ras_lab),) = _cases(ras_dir)
    ((lps_img, lps_lab),) = _cases(lps_dir)
    assert nib.aff2axcodes(load_nifti(lps_lab).affine) == ("L", "P", "S")
    assert not np.array_equal(np.asarray(load_nifti(ras_lab).dataobj), np.asarray(load_nifti(lps_lab).dataobj))
    for ras_path, lps_path in ((ras_img, lps_img), (ras_lab, lps_lab)):
        a = nib.as_closest_canonical(load_nifti(ras_path))
        b = nib.as_closest_canonical(load_nifti(lps_path))
        assert np.allclose(a.affine, b.affine)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


# --------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------
def test_same_seed_gives_identical_arrays(tmp_path: Path) -> None:
    signature = default_signatures(2)[1]
    first = _arrays(generate_site(tmp_path / "a", "site-x", 2, SHAPE, signature, seed=5))
    second = _arrays(generate_site(tmp_path / "b", "site-x", 2, SHAPE, signature, seed=5))
    other = _arrays(generate_site(tmp_path / "c", "site-x", 2, SHAPE, signature, seed=6))
    for (img_a, lab_a), (img_b, lab_b), (img_c, lab_c) in zip(first, second, other, strict=True):
        assert img_a.dtype == img_b.dtype and img_a.tobytes() == img_b.tobytes()
        assert lab_a.tobytes() == lab_b.tobytes()
        assert not np.array_equal(img_a, img_c)
        assert not np.array_equal(lab_a, lab_c)


def test_cases_and_sites_hold_different_patients(federation: dict[str, Path]) -> None:
    labels = [lab for d in federation.values() for _, lab in _arrays(d)]
    assert len({lab.tobytes() for lab in labels}) == len(labels)


# --------------------------------------------------------------------------
# Domain shift
# --------------------------------------------------------------------------
def test_default_signatures_differ_per_site() -> None:
    many = default_signatures(25)
    assert len(many) == 25
    assert len(set(many)) == 25
    for field in ("gamma", "bias_strength", "noise_std", "spacing", "intensity_scale"):
        first_three = {getattr(s, field) for s in many[:3]}
        assert len(first_three) == 3, field
    assert default_signatures(25) == many


def test_strength_zero_gives_identical_neutral_scanners() -> None:
    neutral = default_signatures(4, strength=0.0)
    assert len(set(neutral)) == 1
    scanner = neutral[0]
    assert scanner.gamma == 1.0 and scanner.bias_strength == 0.0
    assert scanner.spacing == (1.0, 1.0, 1.0) and scanner.orientation == "RAS"
    assert scanner.intensity_scale == 1.0 and scanner.intensity_offset == 0.0


def test_sites_have_different_intensity_units(federation: dict[str, Path]) -> None:
    means = [np.mean([img.mean() for img, _ in _arrays(d)]) for d in federation.values()]
    stds = [np.mean([img.std() for img, _ in _arrays(d)]) for d in federation.values()]
    assert len({round(float(m)) for m in means}) == N_SITES
    assert len({round(float(s)) for s in stds}) == N_SITES


def test_zscore_does_not_remove_the_shift(federation: dict[str, Path]) -> None:
    """Per-case z-scoring undoes scale/offset, but not the contrast curve."""
    site_1, site_2 = list(federation.values())[:2]

    def skewness(dataset_dir: Path) -> list[float]:
        return [float(np.mean(_zscore(img) ** 3)) for img, _ in _arrays(dataset_dir)]

    skew_1, skew_2 = skewness(site_1), skewness(site_2)
    assert abs(np.mean(skew_1) - np.mean(skew_2)) > MIN_SKEWNESS_GAP
    assert min(skew_1) > max(skew_2) or min(skew_2) > max(skew_1)


# --------------------------------------------------------------------------
# Idempotence
# --------------------------------------------------------------------------
def test_second_call_does_not_rewrite(tmp_path: Path) -> None:
    first = generate_federation(tmp_path, n_sites=2, n_cases=2)
    _age_files(tmp_path)
    before = _mtimes(tmp_path)
    second = generate_federation(tmp_path, n_sites=2, n_cases=2)
    assert second == first
    assert _mtimes(tmp_path) == before


def test_incomplete_site_is_regenerated(tmp_path: Path) -> None:
    sites = generate_federation(tmp_path, n_sites=2, n_cases=2)
    (sites["site-2"] / ".complete").unlink()
    _age_files(tmp_path)
    generate_federation(tmp_path, n_sites=2, n_cases=2)
    assert all(t == OLD_MTIME_NS for t in _mtimes(sites["site-1"]).values())
    rewritten = _mtimes(sites["site-2"])
    assert (sites["site-2"] / ".complete") in rewritten
    assert all(t > OLD_MTIME_NS for t in rewritten.values())


def test_changed_arguments_are_regenerated(tmp_path: Path) -> None:
    sites = generate_federation(tmp_path, n_sites=1, n_cases=3)
    generate_federation(tmp_path, n_sites=1, n_cases=2, strength=0.5)
    assert len(list((sites["site-1"] / "imagesTr").iterdir())) == 2
    meta = json.loads((sites["site-1"] / "dataset.json").read_text())
    assert meta["numTraining"] == 2


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"orientation": "XYZ"},
        {"orientation": "RRS"},
        {"gamma": 0.0},
        {"bias_strength": 1.0},
        {"spacing": (1.0, 1.0)},
    ],
)
def test_invalid_signature_is_rejected(kwargs: dict) -> None:
    base = default_signatures(1)[0]
    with pytest.raises(ValueError):
        ScannerSignature(**{**base.__dict__, **kwargs})


@pytest.mark.parametrize("n_sites, strength", [(0, 1.0), (2, -0.5)])
def test_invalid_federation_is_rejected(n_sites: int, strength: float) -> None:
    with pytest.raises(ValueError):
        default_signatures(n_sites, strength)


def test_test_cases_are_other_patients_of_the_same_scanner(tmp_path: Path) -> None:
    sites = generate_federation(tmp_path, n_sites=1, n_cases=2, n_test=2)
    site = sites["site-1"]
    tests = sorted((site / "imagesTs").iterdir())
    assert len(tests) == 2 and len(list((site / "labelsTs").iterdir())) == 2
    train = sorted((site / "imagesTr").iterdir())
    test_arrays = [np.asarray(load_nifti(p).dataobj) for p in tests]
    train_arrays = [np.asarray(load_nifti(p).dataobj) for p in train]
    assert all(not np.array_equal(a, b) for a in test_arrays for b in train_arrays)
    assert load_nifti(tests[0]).header.get_zooms() == load_nifti(train[0]).header.get_zooms()
    assert json.loads((site / "dataset.json").read_text())["numTraining"] == 2
    generate_federation(tmp_path, n_sites=1, n_cases=2)
    assert not (site / "imagesTs").exists(), "a federation drawn without test cases has none"
