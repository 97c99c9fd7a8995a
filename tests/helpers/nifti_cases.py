"""Small real NIfTI datasets written with nibabel, in both layouts, for the data-pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from common.reading import load_nifti

SHAPE = (24, 20, 16)
RAS = np.diag([1.0, 1.2, 2.0, 1.0])
LPS = np.diag([-1.0, -1.2, 2.0, 1.0])


def oblique(spacing=(1.0, 1.2, 2.0), degrees: float = 20.0) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    return affine


def phantom(shape=SHAPE, seed: int = 0, lesion: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright cube of label 1 (``lesion`` voxels on a side) in noise."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, size=shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    c = [s // 2 for s in shape]
    label[
        c[0] - lesion // 2 : c[0] - lesion // 2 + lesion,
        c[1] - lesion // 2 : c[1] - lesion // 2 + lesion,
        c[2] - lesion // 2 : c[2] - lesion // 2 + lesion,
    ] = 1
    image[label > 0] += 80.0
    return image, label


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def nnunet_dataset(
    root: Path, n_cases: int = 3, channels: tuple[str, ...] = ("CT",), affine=RAS, annotators: int = 1, shape=SHAPE
) -> Path:
    """DatasetXXX in the nnU-Net raw layout; extra annotators in labelsTr_rN folders."""
    folders = ["labelsTr", *(f"labelsTr_r{i}" for i in range(2, annotators + 1))]
    meta = {
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    if annotators > 1:
        meta["annotators"] = folders
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for i in range(n_cases):
        image, label = phantom(shape, seed=i)
        for c in range(len(channels)):
            save(image * (c + 1), affine, root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz")
        for a, folder in enumerate(folders):
            save(np.roll(label, a, axis=0), affine, root / folder / f"case_{i:03d}.nii.gz")
    return root


def msd_dataset(root: Path, n_cases: int = 3, modalities: tuple[str, ...] = ("T1", "T2"), affine=RAS) -> Path:
    """Decathlon layout: one 4D (channel-last) image per case and a training list."""
    training: list[dict[str, str]] = []
    meta = {
        "name": "Test",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": n_cases,
        "training": training,
    }
    for i in range(n_cases):
        image, label = phantom(seed=i)
        stack = np.stack([image * (c + 1) for c in range(len(modalities))], axis=-1)
        save(stack if len(modalities) > 1 else image, affine, root / "imagesTr" / f"case_{i}.nii.gz")
        save(label, affine, root / "labelsTr" / f"case_{i}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def split_into_two_classes(dataset: Path, names: tuple[str, str] = ("core", "rim")) -> Path:
    """Turn a dataset's one foreground class into two: the half of each lesion nearer the R edge and the rest.

    The files stay real NIfTI written by nibabel; ``names`` says which name value 1 and value 2 get in
    dataset.json, so swapping them gives a site that codes the same labels with the other values.
    """
    meta = json.loads((dataset / "dataset.json").read_text())
    first, second = names
    swap = names == ("rim", "core")
    for path in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        img = load_nifti(path)
        label = np.asarray(img.dataobj).astype(np.uint8)
        xs = np.nonzero(label)[0]
        core = (label > 0) & (np.arange(label.shape[0])[:, None, None] < (xs.mean() if xs.size else 0))
        out = np.where(label > 0, 2, 0).astype(np.uint8)
        out[core] = 1
        if swap:
            out = np.choose(out, [0, 2, 1]).astype(np.uint8)
        nib.save(nib.Nifti1Image(out, img.affine), str(path))
    meta["labels"] = {"background": 0, first: 1, second: 2}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    return dataset
