"""A prediction as a DICOM Segmentation (highdicom) that references its source series and names no patient.

A PACS viewer shows a DICOM-SEG over the series it was made on. The standard
needs the SEG to say which images it segments and in which space, so these
attributes of the source are copied, and nothing else:

- ``StudyInstanceUID``: the SEG belongs to the source's study (General Study, type 1);
- ``SeriesInstanceUID``, each slice's ``SOPClassUID`` and ``SOPInstanceUID``: the
  referenced series and the source image of every frame (Common Instance
  Reference, Derivation Image);
- ``FrameOfReferenceUID``: the SEG lies in the source's patient space (Frame of Reference, type 1);
- the geometry (``ImageOrientationPatient``, ``PixelSpacing``, each slice's
  ``ImagePositionPatient``, the slice step): where every frame lies.

The Patient and General Study modules' type 2 attributes (``PatientName``,
``PatientID``, ``PatientBirthDate``, ``PatientSex``, ``StudyDate``,
``StudyTime``, ``ReferringPhysicianName``, ``StudyID``, ``AccessionNumber``)
must be present and are written empty. highdicom copies the whole Patient and
Study modules of the image it is given, so it is given a stand-in per slice
that holds only the attributes above (``reference_slices``), never the file
itself.

One segment per foreground class: segment number = label value, the label's
name as ``SegmentLabel``, and as the segmented property type a code of the
local scheme ``99FEDSEG`` whose value is the label's federation code
(common/labels.py), so two sites' SEGs code the same class alike.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from common.dicom_series import LPS_TO_RAS, Series
from common.labels import name_code
from common.private import private_file

CODING_SCHEME = "99FEDSEG"
"""A local coding scheme (DICOM PS3.16 8.2: designators starting with 99) for fedseg's label names."""
EMPTY_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Patient and General Study attributes the SEG must carry (type 2) and carries empty."""
MANUFACTURER = "fedseg"
MODEL_NAME = "fedseg-client predict"
SEG_SERIES_NUMBER = 9901
"""Series number of fedseg's SEG series; a viewer lists it after the scanner's own series."""


def reference_slices(series: Series) -> list[Dataset]:
    """One stand-in per source slice: its UIDs and geometry, and the type 2 patient/study attributes empty."""
    refs = series.references
    lps = LPS_TO_RAS @ series.affine
    slices = []
    for uid, position in zip(refs.sop_instance_uids, series.positions, strict=True):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = refs.sop_class_uid, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = refs.study_uid, refs.series_uid
        ds.FrameOfReferenceUID = refs.frame_of_reference_uid
        ds.Modality = series.modality
        ds.Columns, ds.Rows = series.shape[0], series.shape[1]
        ds.ImageOrientationPatient = [float(v) for v in series.orientation]
        ds.PixelSpacing = [float(v) for v in series.pixel_spacing]
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        for keyword in EMPTY_TYPE_2:
            setattr(ds, keyword, "")
        slices.append(ds)
    return slices


def segment_descriptions(labels: dict[str, int], num_classes: int, version: str) -> list[hd.seg.SegmentDescription]:
    """One description per foreground class, named and coded from the model's labels."""
    names = {value: name for name, value in labels.items()}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=MANUFACTURER, version=version, family=codes.cid7162.ArtificialIntelligence
    )
    out = []
    for value in range(1, num_classes):
        name = names.get(value, f"class-{value}")
        out.append(
            hd.seg.SegmentDescription(
                segment_number=value,
                segment_label=name[:64],
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=hd.sr.CodedConcept(str(name_code(name)), CODING_SCHEME, name[:64]),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return out


def write_dicom_seg(
    label: np.ndarray, series: Series, labels: dict[str, int], num_classes: int, path: Path, version: str
) -> None:
    """Write ``label`` [columns, rows, slices] (the series' voxels) as a binary DICOM-SEG at ``path`` (0600)."""
    if tuple(label.shape) != series.shape:
        raise ValueError(f"label map {label.shape} is not on the grid {series.shape} of {series.folder}")
    frames = np.ascontiguousarray(np.transpose(label, (2, 1, 0)))  # [slices, rows, columns], as the slices
    seg = hd.seg.Segmentation(
        source_images=reference_slices(series),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(labels, num_classes, version),
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=version,
        device_serial_number=version,
        content_label="FEDSEG",
        content_description="fedseg prediction",
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    seg.save_as(private_file(path))
