"""A DICOM series folder read as one channel of a case: voxels, geometry and modality, nothing else.

A hospital exports a scan from PACS as one folder of slice files. fedseg reads
it with pydicom directly (not MONAI's PydicomReader, which copies every header
into the array's metadata) and keeps only what segmentation needs:

- the voxels, as stored values times ``RescaleSlope`` plus ``RescaleIntercept``
  (Hounsfield units for CT), float32;
- the geometry: ``ImageOrientationPatient``, ``PixelSpacing`` and the slices'
  ``ImagePositionPatient``, as an affine in fedseg's NIfTI convention (RAS
  world coordinates; voxel axes column, row, slice, the slices in ascending
  order along the normal of the image plane, as dcm2niix and ITK sort them);
- the ``Modality`` (CT, MR, PT ...), to compare with the channel's name.

Everything else (patient, study, institution, dates, descriptions) stays in the
files. Prediction also keeps the source slices' UIDs in memory
(``SeriesReferences``), only to reference them from a DICOM-SEG
(client/dicom_seg.py).

A folder must hold exactly one volume: ``series_problems`` names a folder that
mixes series, a localizer, a single slice, slices whose size or orientation
differ, and slices missing or unevenly spaced, each with the fix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.misc import is_dicom

POSITION_TOLERANCE_MM = 0.01
"""Slice steps may differ by float noise only; beyond it a slice is missing or the spacing uneven."""
STEP_TOLERANCE = 0.01
"""Relative difference between slice steps still counted as even."""
LOCALIZER = "LOCALIZER"
"""ImageType value 3 of a scout image (a projection, not a slice of the volume)."""
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM's patient space is LPS; fedseg's affines, like NIfTI's, are RAS."""
MODALITY_OF_CHANNEL = {
    "CT": "CT",
    **dict.fromkeys(
        (
            "MR",
            "MRI",
            "T1",
            "T1W",
            "T1C",
            "T1CE",
            "T1GD",
            "T2",
            "T2W",
            "FLAIR",
            "ADC",
            "DWI",
            "PD",
            "SWI",
            "T2STAR",
            "DCE",
            "HBV",
        ),
        "MR",
    ),
    **dict.fromkeys(("PT", "PET"), "PT"),
}
"""The DICOM Modality a channel name implies (upper case); a name not listed implies none and is not compared."""


class DicomSeriesError(ValueError):
    """A series folder is not one readable volume; the message names the folder, the problem and the fix."""


@dataclass(frozen=True)
class SeriesReferences:
    """What a DICOM-SEG must name to reference its source: UIDs only, in slice order."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class Series:
    """One series folder's headers reduced to geometry, modality and references (no patient data)."""

    folder: Path
    files: tuple[Path, ...]
    """Slice files in ascending order along the image plane's normal (voxel axis 2)."""
    modality: str
    shape: tuple[int, int, int]
    """(columns, rows, slices)."""
    affine: np.ndarray
    """Voxel (column, row, slice) -> RAS mm."""
    orientation: tuple[float, ...]
    """ImageOrientationPatient (row then column direction cosines, LPS)."""
    pixel_spacing: tuple[float, float]
    """PixelSpacing: between rows, between columns (mm)."""
    positions: np.ndarray
    """[slices, 3] ImagePositionPatient (LPS mm), in slice order."""
    references: SeriesReferences

    @property
    def zooms(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def expected_modality(channel_name: str) -> str | None:
    """The DICOM Modality the channel's name implies (CT -> CT, T2 -> MR ...), or None when it implies none."""
    return MODALITY_OF_CHANNEL.get(channel_name.strip().upper().replace("-", "").replace("*", "STAR"))


def is_series_folder(path: Path) -> bool:
    """A folder with at least one DICOM file directly inside it (a folder of series folders is not one)."""
    return path.is_dir() and any(f.is_file() and is_dicom(f) for f in _files(path))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _headers(folder: Path) -> tuple[list[tuple[Path, pydicom.Dataset]], list[str]]:
    """Every slice file's header (no pixel data) and the problems of files that are not DICOM images."""
    found: list[tuple[Path, pydicom.Dataset]] = []
    problems: list[str] = []
    for path in _files(folder):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:  # pydicom raises several kinds for files that are not DICOM
            problems.append(f"{path.name} is not a DICOM file ({type(err).__name__}); move it out of the series folder")
            continue
        if "ImagePositionPatient" not in header or "ImageOrientationPatient" not in header:
            problems.append(
                f"{path.name} is not an image slice with a position (SOP class "
                f"{header.get('SOPClassUID', '?')}); move it out of the series folder"
            )
            continue
        found.append((path, header))
    return found, problems


def _mixed(headers: list[pydicom.Dataset]) -> str | None:
    series = Counter((h.get("SeriesInstanceUID"), h.get("SeriesNumber")) for h in headers)
    if len(series) < 2:
        return None
    parts = ", ".join(f"series number {number}: {n} file(s)" for (_, number), n in series.items())
    return f"mixes {len(series)} series ({parts}); put each series in its own folder (one series per case channel)"


def _uniform(headers: list[pydicom.Dataset]) -> list[str]:
    problems = []
    for keyword, what in (
        ("Rows", "row counts"),
        ("Columns", "column counts"),
        ("PixelSpacing", "pixel spacings"),
        ("Modality", "modalities"),
    ):
        values = {
            tuple(np.atleast_1d(h.get(keyword, ()))) if keyword == "PixelSpacing" else h.get(keyword) for h in headers
        }
        if len(values) > 1:
            problems.append(f"slices have different {what} {sorted(map(str, values))}; export the series again")
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        problems.append("slices have different orientations (ImageOrientationPatient); export the series again")
    return problems


def _slice_problems(steps: np.ndarray) -> list[str]:
    """Missing or uneven slices, from the distances between consecutive slices along the normal."""
    if np.any(steps < POSITION_TOLERANCE_MM):
        return [
            f"{int(np.sum(steps < POSITION_TOLERANCE_MM))} slice(s) at the same position as another (a "
            "duplicate or a second series); keep one file per position"
        ]
    step = float(np.median(steps))
    off = np.abs(steps - step) > max(POSITION_TOLERANCE_MM, STEP_TOLERANCE * step)
    if not np.any(off):
        return []
    gaps = [
        i
        for i in np.flatnonzero(off)
        if steps[i] > 1.5 * step
        and abs(steps[i] / step - round(steps[i] / step)) < STEP_TOLERANCE * round(steps[i] / step)
    ]
    if len(gaps) == int(off.sum()):
        missing = int(sum(round(steps[i] / step) - 1 for i in gaps))
        where = ", ".join(f"after slice {i + 1}" for i in gaps[:5])
        return [
            f"{missing} slice(s) missing ({where}, the slices are {step:.4g} mm apart); export the whole series again"
        ]
    return [
        f"uneven slice spacing ({steps.min():.4g} to {steps.max():.4g} mm); resample the series to even "
        "slices (or export it again)"
    ]


def _geometry(headers: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(affine LPS->RAS, positions in slice order, the order of ``headers`` along the normal)."""
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    order = list(np.argsort(positions @ normal, kind="stable"))
    positions = positions[order]
    row_spacing, col_spacing = (float(v) for v in headers[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # along a row: column index grows
    lps[:3, 1] = col_dir * row_spacing  # along a column: row index grows
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1 else normal
    lps[:3, 3] = positions[0]
    return LPS_TO_RAS @ lps, positions, order


def _tilt(positions: np.ndarray, affine: np.ndarray) -> str | None:
    """Slices that shift within the image plane (gantry tilt) do not lie on one straight stack."""
    step = positions[-1] - positions[0]
    if len(positions) < 2 or np.linalg.norm(step) == 0:
        return None
    expected = positions[0] + np.outer(np.arange(len(positions)) / (len(positions) - 1), step)
    if np.abs(positions - expected).max() > max(POSITION_TOLERANCE_MM, STEP_TOLERANCE * np.linalg.norm(step)):
        return None  # uneven steps along the line: reported by _slice_problems
    lps = LPS_TO_RAS @ affine
    normal = np.cross(lps[:3, 0], lps[:3, 1])
    cos = abs(float(normal @ step)) / float(np.linalg.norm(normal) * np.linalg.norm(step))
    if cos < 1 - 1e-4:
        return (
            f"the slices are stacked at {np.degrees(np.arccos(min(cos, 1.0))):.1f} degrees to their normal "
            "(gantry tilt); resample the series to an orthogonal stack first"
        )
    return None


def inspect_series(folder: Path) -> tuple[Series | None, list[str]]:
    """The series in ``folder`` from its headers, or None with every problem that stops it being one volume."""
    headers, problems = _headers(folder)
    if not headers:
        return None, problems or ["holds no DICOM image slice; point the case at a series folder"]
    datasets = [h for _, h in headers]
    if mixed := _mixed(datasets):
        return None, [*problems, mixed]
    if any(LOCALIZER in [str(v).upper() for v in h.get("ImageType", [])] for h in datasets):
        return None, [*problems, "is a localizer (scout) series, not a volume; remove it from the dataset"]
    if len(datasets) < 2:
        return None, [*problems, "holds a single slice, not a volume; export the whole series"]
    problems += _uniform(datasets)
    if problems:
        return None, problems
    affine, positions, order = _geometry(datasets)
    normal = np.cross(*(np.array([float(v) for v in datasets[0].ImageOrientationPatient]).reshape(2, 3)))
    problems += _slice_problems(np.diff(positions @ normal))
    if not problems and (tilt := _tilt(positions, affine)):
        problems.append(tilt)
    if problems:
        return None, problems
    first = datasets[order[0]]
    references = SeriesReferences(
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uids=tuple(str(datasets[i].SOPInstanceUID) for i in order),
    )
    return Series(
        folder=folder,
        files=tuple(headers[i][0] for i in order),
        modality=str(first.get("Modality", "")).upper(),
        shape=(int(first.Columns), int(first.Rows), len(order)),
        affine=affine,
        orientation=tuple(float(v) for v in first.ImageOrientationPatient),
        pixel_spacing=(float(first.PixelSpacing[0]), float(first.PixelSpacing[1])),
        positions=positions,
        references=references,
    ), []


def open_series(folder: Path) -> Series:
    """The series in ``folder``; DicomSeriesError names every problem and its fix."""
    series, problems = inspect_series(folder)
    if series is None:
        raise DicomSeriesError(f"DICOM series folder {folder}: " + "; ".join(problems) + ".")
    return series


def series_voxels(series: Series) -> np.ndarray:
    """The volume [columns, rows, slices] float32: stored values times RescaleSlope plus RescaleIntercept."""
    volume = np.empty(series.shape, dtype=np.float32, order="F")
    for k, path in enumerate(series.files):
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        try:
            pixels = ds.pixel_array
        except Exception as err:  # a compressed transfer syntax without its decoder, or truncated pixel data
            raise DicomSeriesError(
                f"{path}: its pixel data cannot be decoded ({type(err).__name__}: {err}); "
                "export the series uncompressed (or decompress it, e.g. gdcmconv --raw)."
            ) from err
        volume[:, :, k] = (pixels.astype(np.float32) * slope + intercept).T
    return volume


def seg_labels(path: Path, series: Series) -> np.ndarray:
    """A DICOM-SEG label map on ``series``' voxels [columns, rows, slices] uint8; segment number = label value.

    The SEG must reference the series' slices (as ``fedseg-client predict --output-format dicom-seg`` writes
    it); slices it has no frame for are background.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as err:  # pydicom/highdicom raise several kinds for a file that is not a SEG
        raise DicomSeriesError(
            f"{path} is not a readable DICOM Segmentation ({type(err).__name__}: {err}); "
            "give the label as a DICOM-SEG of the case's series or as NIfTI."
        ) from err
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if series.references.series_uid not in referenced:
        raise DicomSeriesError(
            f"{path} does not reference the series in {series.folder}; a label SEG must be "
            "made on the case's own series."
        )
    labels = seg.get_pixels_by_source_instance(
        list(series.references.sop_instance_uids),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
        dtype=np.uint8,
    )
    return np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))
