"""A site's dataset as it lies on disk, read without conversion.

Two layouts are understood, told apart by their dataset.json:

- **nnU-Net v2 raw** (``channel_names``, ``labels``, ``file_ending``):
  ``imagesTr/{case}_{channel:04d}{ending}`` holds one 3D file per channel and
  ``labelsTr/{case}{ending}`` the integer label map.
- **Medical Segmentation Decathlon** (a ``training`` list of
  ``{"image": ..., "label": ...}``, ``modality``, ``labels`` keyed by value):
  one file per case, 4D (channel last) when there are several modalities.

Test sets: an nnU-Net ``imagesTs``/``labelsTs`` pair, or MSD ``test`` entries
that name a label (``{"image": ..., "label": ...}``), are the site's test
cases; test images without a label are ignored. Images and labels that have
no partner are kept aside in ``DatasetSpec.unpaired`` (never trained on) for
the preflight check to report.

DICOM: any image channel may be a DICOM series folder instead of a NIfTI file
(``imagesTr/{case}_{channel:04d}/``, one series per folder, read by
common/dicom_series.py), and a label may be a DICOM-SEG on that series
(``labelsTr/{case}.dcm``) instead of NIfTI; dataset.json is unchanged
(``file_ending`` stays the ending of the NIfTI files). In the Decathlon layout
an ``image`` entry may name a series folder.

Several annotators: an nnU-Net dataset.json may list ``"annotators":
["labelsTr", "labelsTr_reader2", ...]`` (label folders, the first is the
reference); in the MSD layout a ``label`` entry may be a list of files. Every
case must then have one label file per annotator.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
TEST_IMAGES_DIR = "imagesTs"
TEST_LABELS_DIR = "labelsTs"
IMAGE_WITHOUT_LABEL = "image without a label"
LABEL_WITHOUT_IMAGE = "label without an image"
CHANNEL_SUFFIX_DIGITS = 4
SAFE_CASE_ID = re.compile(r"[A-Za-z0-9._-]+")
NIFTI_ENDINGS = (".nii.gz", ".nii")
DICOM_SEG_ENDING = ".dcm"
"""A label file with this ending is a DICOM-SEG of its case's series (common/reading.py reads it)."""
CT_MODALITY = "CT"
"""Channel name that selects CT normalization (nnU-Net's convention)."""

Layout = Literal["nnunet", "msd"]


class DatasetError(ValueError):
    """The dataset folder does not follow the expected layout; the message says where."""


@dataclass(frozen=True)
class Case:
    """One training case: its image file(s) and one label file per annotator."""

    case_id: str
    images: tuple[Path, ...]
    """One 3D file per channel (nnU-Net), or a single 3D/4D file (MSD)."""
    labels: tuple[Path, ...]
    """One label map per annotator; the first is the reference annotator."""

    @property
    def label(self) -> Path:
        return self.labels[0]


@dataclass(frozen=True)
class Unpaired:
    """A file whose partner is missing: an image without a label, or a label without an image."""

    file: str
    """Path relative to the dataset folder."""
    problem: str


@dataclass(frozen=True)
class DatasetSpec:
    """What dataset.json declares plus the cases found on disk."""

    root: Path
    layout: Layout
    channel_names: dict[str, str]
    labels: dict[str, int]
    """Label name -> integer value, as in nnU-Net's dataset.json."""
    file_ending: str
    cases: tuple[Case, ...]
    annotators: tuple[str, ...] = (LABELS_DIR,)
    test_cases: tuple[Case, ...] = ()
    """Labelled test cases (imagesTs/labelsTs, or MSD test entries with a label): scored, never chosen on."""
    unpaired: tuple[Unpaired, ...] = ()
    num_training: int | None = None
    """dataset.json's numTraining, when it declares one."""

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def channel_is_ct(self) -> list[bool]:
        """Per channel (in channel order): does it hold CT intensities (Hounsfield units)?"""
        return [self.channel_names[k].strip().upper() == CT_MODALITY for k in sorted(self.channel_names, key=int)]

    def case(self, case_id: str) -> Case:
        for case in (*self.cases, *self.test_cases):
            if case.case_id == case_id:
                return case
        raise DatasetError(f"case '{case_id}' is not in {self.root}.")


def _read_dataset_json(root: Path) -> dict:
    path = root / DATASET_JSON
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: point site.data_dir at an nnU-Net raw or Medical Segmentation Decathlon "
            "dataset folder (the one holding dataset.json, imagesTr and labelsTr)."
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err}.") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold a JSON object.")
    return meta


def _int_labels(labels: dict, path: Path) -> dict[str, int]:
    """nnU-Net labels: name -> integer. Region-based (list-valued) labels are not supported."""
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)) or int(value) != value:
            raise DatasetError(
                f"{path}: label '{name}' maps to {value!r}; fedseg supports integer labels only "
                "(not nnU-Net's region-based training)."
            )
        out[str(name)] = int(value)
    if sorted(out.values()) != list(range(len(out))):
        raise DatasetError(f"{path}: label values {sorted(out.values())} must be consecutive from 0 (background).")
    return out


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _nnunet_pairs(
    root: Path, meta: dict, images_dir: str, label_dirs: tuple[str, ...]
) -> tuple[list[Case], list[Unpaired]]:
    """Cases of one image folder and its label folder(s), and the labels whose images are missing."""
    ending = meta["file_ending"]
    channels = sorted(meta["channel_names"], key=int)
    reference = root / label_dirs[0]
    label_files = (
        sorted(
            p
            for p in reference.iterdir()
            if not p.name.startswith(".") and p.is_file() and p.name.endswith((ending, DICOM_SEG_ENDING))
        )
        if reference.is_dir()
        else []
    )
    cases, unpaired = [], []
    for label in label_files:
        case_id = _label_case(label.name, ending)
        images = tuple(_channel_image(root / images_dir, case_id, int(c), ending) for c in channels)
        labels = tuple(_annotation(root / folder, case_id, ending) for folder in label_dirs)
        if missing_images := [_rel(p, root) for p in images if not p.exists()]:
            unpaired.append(Unpaired(_rel(label, root), f"{LABEL_WITHOUT_IMAGE} (missing {missing_images})"))
            continue
        if missing := [_rel(p, root) for p in labels if not p.is_file()]:
            raise DatasetError(f"case '{case_id}' in {root}: missing file(s) {missing}.")
        cases.append(Case(case_id, images, labels))
    return cases, unpaired


def _channel_image(folder: Path, case_id: str, channel: int, ending: str) -> Path:
    """A case's channel: the NIfTI file ``{case}_{cccc}{ending}``, or else the DICOM series folder
    ``{case}_{cccc}/``."""
    name = f"{case_id}_{channel:0{CHANNEL_SUFFIX_DIGITS}d}"
    return (
        folder / name
        if not (folder / f"{name}{ending}").is_file() and (folder / name).is_dir()
        else folder / f"{name}{ending}"
    )


def _annotation(folder: Path, case_id: str, ending: str) -> Path:
    """A case's label in one label folder: NIfTI, or else a DICOM-SEG; both at once is refused."""
    nifti, seg = folder / f"{case_id}{ending}", folder / f"{case_id}{DICOM_SEG_ENDING}"
    if nifti.is_file() and seg.is_file():
        raise DatasetError(f"{folder}: case '{case_id}' has two labels, {nifti.name} and {seg.name}; keep one.")
    return seg if seg.is_file() else nifti


def _images_without_label(root: Path, meta: dict, labelled: set[str]) -> list[Unpaired]:
    """imagesTr files or series folders (any channel) whose case has no label file."""
    ending = meta["file_ending"]
    suffix_len = 1 + CHANNEL_SUFFIX_DIGITS
    folder = root / IMAGES_DIR
    found = (
        sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.name.endswith(ending)))
        if folder.is_dir()
        else []
    )
    stem = lambda p: p.name if p.is_dir() else p.name[: -len(ending)]  # noqa: E731
    return [Unpaired(_rel(p, root), IMAGE_WITHOUT_LABEL) for p in found if stem(p)[:-suffix_len] not in labelled]


def _read_nnunet(root: Path, meta: dict) -> DatasetSpec:
    path = root / DATASET_JSON
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise DatasetError(f"{path} lacks the key '{key}' required by the nnU-Net raw layout.")
    annotators = tuple(meta.get("annotators") or (LABELS_DIR,))
    cases, unpaired = _nnunet_pairs(root, meta, IMAGES_DIR, annotators)
    if not cases and not unpaired:
        raise DatasetError(f"no label files matching *{meta['file_ending']} in {root / annotators[0]}.")
    test_cases, test_unpaired = _nnunet_pairs(root, meta, TEST_IMAGES_DIR, (TEST_LABELS_DIR,))
    labelled = {c.case_id for c in cases} | {_label_case(Path(u.file).name, meta["file_ending"]) for u in unpaired}
    return DatasetSpec(
        root=root,
        layout="nnunet",
        channel_names={str(k): str(v) for k, v in meta["channel_names"].items()},
        labels=_int_labels(meta["labels"], path),
        file_ending=meta["file_ending"],
        cases=tuple(cases),
        annotators=annotators,
        test_cases=tuple(test_cases),
        unpaired=(*unpaired, *_images_without_label(root, meta, labelled), *test_unpaired),
        num_training=meta.get("numTraining"),
    )


def _label_case(name: str, ending: str) -> str:
    return name[: -len(ending if name.endswith(ending) else DICOM_SEG_ENDING)]


def _ending_of(name: str) -> str:
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return ending
    raise DatasetError(f"'{name}' is not a NIfTI file (.nii or .nii.gz).")


def _msd_cases(root: Path, path: Path, entries: list, what: str) -> tuple[list[Case], list[Unpaired], set[Path]]:
    """Cases of a Decathlon list, the entries whose image or label file is missing, and every file named."""
    cases, unpaired, named, n_annotators = [], [], set(), None
    base = root.resolve()
    for i, entry in enumerate(entries):
        if what == "test" and not (isinstance(entry, dict) and "label" in entry):
            continue  # an unlabelled test image: nothing to score
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f"{path}: {what} entry {i} needs 'image' and 'label'.")
        image = (root / entry["image"]).resolve()
        label_entries = entry["label"] if isinstance(entry["label"], list) else [entry["label"]]
        label_paths = tuple((root / p).resolve() for p in label_entries)
        named |= {image, *label_paths}
        if n_annotators not in (None, len(label_paths)):
            raise DatasetError(f"{path}: {what} entry {i} has {len(label_paths)} labels, others {n_annotators}.")
        n_annotators = len(label_paths)
        if not image.is_file() and not image.is_dir():
            unpaired += [Unpaired(_rel(p, base), LABEL_WITHOUT_IMAGE) for p in label_paths if p.is_file()]
            continue
        if not all(p.is_file() for p in label_paths):
            unpaired.append(Unpaired(_rel(image, base), IMAGE_WITHOUT_LABEL))
            continue
        case_id = image.name if image.is_dir() else image.name[: -len(_ending_of(image.name))]
        cases.append(Case(case_id, (image,), label_paths))
    return sorted(cases, key=lambda c: c.case_id), unpaired, named


def _unlisted(root: Path, named: set[Path]) -> list[Unpaired]:
    """Files in imagesTr/labelsTr that no training entry names: they have no partner."""
    found = []
    for folder, problem in ((IMAGES_DIR, IMAGE_WITHOUT_LABEL), (LABELS_DIR, LABEL_WITHOUT_IMAGE)):
        listed = (root / folder).iterdir() if (root / folder).is_dir() else ()
        for p in sorted(p for p in listed if p.name.endswith((*NIFTI_ENDINGS, DICOM_SEG_ENDING)) or p.is_dir()):
            if not p.name.startswith(".") and p.resolve() not in named:
                found.append(Unpaired(_rel(p, root), f"{problem} (not in dataset.json's training list)"))
    return found


def _read_msd(root: Path, meta: dict) -> DatasetSpec:
    """MSD: labels are keyed by value ({"0": "background"}), channels by "modality"."""
    path = root / DATASET_JSON
    modality = meta.get("modality") or meta.get("channel_names")
    if not modality or "labels" not in meta:
        raise DatasetError(f"{path}: a Decathlon dataset.json needs 'modality' and 'labels' next to 'training'.")
    labels = _int_labels({name: int(value) for value, name in meta["labels"].items()}, path)
    cases, unpaired, named = _msd_cases(root, path, meta["training"], "training")
    if not cases:
        raise DatasetError(f"{path}: the 'training' list names no complete case.")
    test_cases, test_unpaired, _ = _msd_cases(root, path, meta.get("test") or [], "test")
    return DatasetSpec(
        root=root,
        layout="msd",
        channel_names={str(k): str(v) for k, v in modality.items()},
        labels=labels,
        file_ending=next(
            (_ending_of(p.name) for c in cases for p in (*c.images, *c.labels) if p.name.endswith(NIFTI_ENDINGS)),
            NIFTI_ENDINGS[0],
        ),
        cases=tuple(cases),
        annotators=tuple(f"annotator-{i + 1}" for i in range(len(cases[0].labels))),
        test_cases=tuple(test_cases),
        unpaired=(*unpaired, *_unlisted(root.resolve(), named), *test_unpaired),
        num_training=meta.get("numTraining"),
    )


def read_dataset(root: Path | str) -> DatasetSpec:
    """Index a dataset folder in either layout; every case must have all its files."""
    root = Path(root)
    meta = _read_dataset_json(root)
    spec = _read_msd(root, meta) if "training" in meta else _read_nnunet(root, meta)
    ids = [c.case_id for c in (*spec.cases, *spec.test_cases)]
    if len(set(ids)) != len(ids):
        raise DatasetError(
            f"{root}: case ids are not unique across training and test cases ({len(ids) - len(set(ids))} duplicates)."
        )
    for case in (*spec.cases, *spec.test_cases):
        check_case_id(case.case_id, case.images[0])
    return spec


def check_case_id(case_id: str, source: Path) -> str:
    """A case id is a folder name in the site's cache: refuse one that could leave it ('..', '/', empty)."""
    if not SAFE_CASE_ID.fullmatch(case_id) or set(case_id) == {"."}:
        raise DatasetError(
            f"{source}: its case id {case_id!r} is not a safe folder name (letters, digits, '.', "
            f"'_', '-', not only dots); rename the file."
        )
    return case_id


def channel_groups(paths: list[Path], channels: int) -> dict[str, tuple[Path, ...]]:
    """Scans to segment, grouped into cases: case name -> one file (or DICOM series folder) per channel, in order.

    nnU-Net names a case's channels ``{case}_{cccc}{ending}`` (a series folder ``{case}_{cccc}``); with several
    channels, those files make one case. Two inputs that would give the same
    case name (``x_0000`` and ``x_0001`` of a one-channel model, or ``x`` and
    ``x_0000``) are refused: the second output would overwrite the first.
    """
    groups: dict[str, dict[int, Path]] = {}
    for path in paths:
        stem = path.name if path.is_dir() else path.name[: -len(_ending_of(path.name))]  # a folder: a DICOM series
        head, _, suffix = stem.rpartition("_")
        numbered = bool(head) and len(suffix) == CHANNEL_SUFFIX_DIGITS and suffix.isdigit()
        case, channel = (head, int(suffix)) if numbered else (stem, 0)
        if channel in groups.setdefault(case, {}):
            raise DatasetError(
                f"{path} and {groups[case][channel]} would both be written as case '{case}'; rename one of them."
            )
        groups[case][channel] = path
    for case, files in groups.items():
        if sorted(files) != list(range(channels)):
            raise DatasetError(
                f"case '{case}' has channel file(s) {sorted(files)}, the model takes channels "
                f"0..{channels - 1} ({case}_0000 ...)."
            )
    return {case: tuple(files[c] for c in range(channels)) for case, files in groups.items()}


def case_draw(case_id: str, seed: int) -> float:
    """A number in [0, 1) that depends on the case id and the seed alone (SHA-256, the same on any machine)."""
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_cases(case_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split in which each case's side depends on that case alone.

    A case is for validation when its draw (``case_draw``) is below
    ``val_fraction``, so adding cases to a site never moves an existing one,
    and the validation share is ``val_fraction`` on average. Only a cohort
    whose draws put every case on one side borrows one case (the lowest draw
    for validation, the highest for training); that choice can change when
    cases are added, and the site says so (client/site_state.py).
    """
    ordered = sorted(case_ids)
    if len(ordered) < 2:  # nothing to hold out: a one-case site trains (or, held out, is scored) on it alone
        return ordered, []
    by_draw = sorted(ordered, key=lambda c: case_draw(c, seed))
    val = {c for c in ordered if case_draw(c, seed) < val_fraction}
    if not val:
        val = {by_draw[0]}
    if len(val) == len(ordered):
        val.discard(by_draw[-1])
    return [c for c in ordered if c not in val], [c for c in ordered if c in val]
