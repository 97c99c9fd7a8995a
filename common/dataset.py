"""A site's dataset as it lies on disk: the nnU-Net v2 raw layout.

``DatasetXXX_Name/dataset.json`` names the channels, labels and file ending;
``imagesTr/{case}_{channel:04d}{ending}`` holds one file per channel and
``labelsTr/{case}{ending}`` the integer label map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
CHANNEL_SUFFIX_DIGITS = 4


class DatasetError(ValueError):
    """The dataset folder does not follow the expected layout; the message says where."""


@dataclass(frozen=True)
class Case:
    """One training case: its channel files in channel order and its label file."""

    case_id: str
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class DatasetSpec:
    """What dataset.json declares plus the cases found on disk."""

    root: Path
    channel_names: dict[str, str]
    labels: dict[str, int]
    file_ending: str
    cases: tuple[Case, ...]

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1


def _read_dataset_json(root: Path) -> dict:
    path = root / DATASET_JSON
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: point site.data_dir at an nnU-Net raw dataset folder "
            "(the one holding dataset.json, imagesTr and labelsTr)."
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err}.") from err
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise DatasetError(f"{path} lacks the key '{key}' required by the nnU-Net raw layout.")
    return meta


def read_dataset(root: Path) -> DatasetSpec:
    """Index a dataset folder; every labelled case must have all its channel files."""
    root = Path(root)
    meta = _read_dataset_json(root)
    ending = meta["file_ending"]
    channels = sorted(meta["channel_names"], key=int)
    labels_dir = root / LABELS_DIR
    label_files = sorted(labels_dir.glob(f"*{ending}"))
    if not label_files:
        raise DatasetError(f"no label files matching *{ending} in {labels_dir}.")
    cases = []
    for label in label_files:
        case_id = label.name[: -len(ending)]
        images = tuple(
            root / IMAGES_DIR / f"{case_id}_{int(c):0{CHANNEL_SUFFIX_DIGITS}d}{ending}" for c in channels
        )
        missing = [p.name for p in images if not p.is_file()]
        if missing:
            raise DatasetError(f"case '{case_id}' in {root}: missing image file(s) {missing}.")
        cases.append(Case(case_id, images, label))
    return DatasetSpec(
        root=root,
        channel_names=dict(meta["channel_names"]),
        labels={str(k): int(v) for k, v in meta["labels"].items()},
        file_ending=ending,
        cases=tuple(cases),
    )


def split_cases(case_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: same ids and seed, same split, on any machine."""
    ordered = sorted(case_ids)
    if len(ordered) < 2:
        raise DatasetError(f"a site needs at least 2 cases to hold one out for validation, found {len(ordered)}.")
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_val = min(max(1, round(val_fraction * len(ordered))), len(ordered) - 1)
    val = sorted(ordered[i] for i in perm[:n_val])
    train = sorted(ordered[i] for i in perm[n_val:])
    return train, val
