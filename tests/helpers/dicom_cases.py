"""DICOM series written with pydicom from real NIfTI volumes, carrying planted identifying attributes.

``write_series`` stores a volume as one slice file per plane: int16 values
with a rescale slope and intercept, the geometry of the NIfTI affine (an
oblique one in the tests), files named in shuffled order, and every
attribute of ``IDENTITY`` filled with a value the tests can look for in the
bytes of what fedseg writes.
"""

from __future__ import annotations

import random
import shutil
import uuid
from pathlib import Path

import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from common.reading import load_nifti
from tests.helpers.nifti_cases import save

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SLOPE, INTERCEPT = 0.5, -20.0
_TOKEN = uuid.uuid4().hex[:8].upper()
"""Drawn per test process, so the planted values are in no file fedseg copies (its app bundle holds this source)."""
_DAY = int(_TOKEN[:2], 16) % 28 + 1
IDENTITY = {
    "PatientName": f"Quagmire{_TOKEN}^Ottoline",
    "PatientID": f"PID-{_TOKEN}-77310",
    "PatientBirthDate": f"194703{_DAY:02d}",
    "PatientAge": f"0{_DAY + 50}Y",
    "PatientAddress": f"12 Plantedstreet {_TOKEN}",
    "OtherPatientIDs": f"OPID-{_TOKEN}",
    "PatientTelephoneNumbers": f"555-{_TOKEN}",
    "InstitutionName": f"Saint Plantedius Hospital {_TOKEN}",
    "InstitutionAddress": f"1 Hospital Road {_TOKEN}",
    "InstitutionalDepartmentName": f"Planted Radiology {_TOKEN}",
    "ReferringPhysicianName": f"Refdoc{_TOKEN}^Barnaby",
    "PerformingPhysicianName": f"Perfdoc{_TOKEN}^Cornelia",
    "OperatorsName": f"Opname{_TOKEN}^Dorothea",
    "NameOfPhysiciansReadingStudy": f"Readdoc{_TOKEN}^Eulalia",
    "AccessionNumber": f"ACC{_TOKEN}",
    "StudyID": f"S{_TOKEN}",
    "StudyDescription": f"Planted study description {_TOKEN}",
    "SeriesDescription": f"Planted series description {_TOKEN}",
    "StationName": f"STATION{_TOKEN}",
    "DeviceSerialNumber": f"SN-{_TOKEN}",
    "StudyDate": f"199904{_DAY:02d}",
    "SeriesDate": f"199805{_DAY:02d}",
    "AcquisitionDate": f"199706{_DAY:02d}",
    "ContentDate": f"199607{_DAY:02d}",
    "StudyTime": f"1011{_DAY:02d}.131415",
    "AdditionalPatientHistory": f"Planted history {_TOKEN}",
}
"""Attributes of the DICOM basic de-identification profile, each with a value no other file holds."""
PATIENT_SEX = "O"


def quantize(volume: np.ndarray) -> np.ndarray:
    """``volume`` as the series stores it: int16 steps of SLOPE from INTERCEPT (exact in float32)."""
    return (np.clip(np.rint((volume - INTERCEPT) / SLOPE), -32768, 32767) * SLOPE + INTERCEPT).astype(np.float32)


def write_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: Path,
    modality: str = "MR",
    study_uid: str | None = None,
    series_number: int = 3,
    localizer: bool = False,
    skip: tuple[int, ...] = (),
) -> list[Path]:
    """One slice file per plane k of ``volume`` [X, Y, Z] with ``affine`` (RAS, det > 0); returns the files.

    ``skip``: slice indices left out (a series with missing slices).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    cols, rows = lps[:3, 0], lps[:3, 1]
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    sop_class = UID(CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE)
    stored = np.rint((quantize(volume) - INTERCEPT) / SLOPE).astype(np.int16)
    order = [k for k in range(volume.shape[2]) if k not in skip]
    names = random.Random(series_number).sample(range(10_000), len(order))
    files = []
    for k, name in zip(order, names, strict=True):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, k + 1
        ds.PatientSex = PATIENT_SEX
        for keyword, value in IDENTITY.items():
            setattr(ds, keyword, value)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer else "AXIAL"]
        ds.ImageOrientationPatient = [*(cols / np.linalg.norm(cols)), *(rows / np.linalg.norm(rows))]
        ds.PixelSpacing = [float(np.linalg.norm(rows)), float(np.linalg.norm(cols))]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"IM{name:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def nifti_to_dicom_case(image: Path, folder: Path, affine: np.ndarray, **kwargs) -> np.ndarray:
    """A NIfTI scan as a series folder with ``affine`` in place of its own; returns the volume the series holds."""
    volume = np.asarray(load_nifti(image).dataobj, dtype=np.float32)
    write_series(volume, affine, folder, **kwargs)
    return quantize(volume)


def double_oblique(zooms: np.ndarray) -> np.ndarray:
    """An affine tilted about two axes (20 and 15 degrees), with the volume's spacing; det > 0."""
    a, b = np.deg2rad(20.0), np.deg2rad(15.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(zooms)
    affine[:3, 3] = [-30.0, 12.5, 40.0]
    return affine


def as_dicom_site(nifti_site: Path, out: Path, reference: Path) -> Path:
    """A copy of ``nifti_site`` whose scans are DICOM series folders on an oblique grid.

    The label maps stay NIfTI, rewritten on the same oblique affine; ``reference`` gets each scan as NIfTI
    with exactly the voxels and affine its series holds.
    """
    shutil.copytree(nifti_site, out)
    for scan in sorted((out / "imagesTr").glob("*_0000.nii.gz")):
        case = scan.name.removesuffix("_0000.nii.gz")
        affine = double_oblique(np.asarray(load_nifti(scan).header.get_zooms()[:3], dtype=float))
        volume = nifti_to_dicom_case(scan, out / "imagesTr" / f"{case}_0000", affine, series_number=3)
        save(volume, affine, reference / f"{case}_0000.nii.gz")
        label = out / "labelsTr" / f"{case}.nii.gz"
        save(np.asarray(load_nifti(label).dataobj, dtype=np.uint8), affine, label)
        scan.unlink()
    return out
