"""DICOM in and DICOM-SEG out, with series written by pydicom from real NIfTI volumes.

One synthetic site's NIfTI scans become DICOM series (int16 with a rescale
slope and intercept, a double-oblique orientation, slice files in shuffled
order, every identifying attribute of the basic de-identification profile
filled in); its label maps stay NIfTI on the same oblique grid. That site is
one of the user's own sites (tests/helpers/own_sites.py) and trains in their
shared simulation (``own_run``) beside NIfTI sites; it then predicts a
DICOM-SEG, read back with highdicom onto the source slices. The bytes of
everything the run and the SEG wrote are searched for the planted values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from client.check import check_dataset
from client.cli import main as client_main
from common.dataset import Case, read_dataset
from common.dicom_series import open_series
from common.plan import ChannelNorm, Plan
from common.preprocess import prepare_case
from common.reading import IMAGE, LABEL, load_image, load_label, load_nifti, read_case
from tests.helpers.dicom_cases import IDENTITY, INTERCEPT, SLOPE, double_oblique, write_series
from tests.helpers.nifti_cases import phantom, save
from tests.helpers.own_sites import DICOM_REFERENCE, SHAPE, TRAIN_CASES, site_yaml_of


def planted_in(path: Path, uids: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The planted identifying values (and ``uids``) whose bytes occur in the file at ``path``."""
    data = path.read_bytes()
    return [v for v in (*IDENTITY.values(), *uids) if v.encode() in data]


@pytest.fixture(scope="module")
def sites(own_sites: tuple[Path, dict[str, Path]]) -> dict[str, Path]:
    """The DICOM site of the user's own sites (tests/helpers/own_sites.py) and the NIfTI its series were made from."""
    config, folders = own_sites
    return {"dicom": folders["dicom"], "reference": config.parent / DICOM_REFERENCE}


def _series_uids(folder: Path) -> set[str]:
    uids = set()
    for f in folder.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    return uids


def test_a_series_reads_as_the_nifti_it_was_made_from(sites):
    spec = read_dataset(sites["dicom"])
    case = spec.cases[0]
    assert case.images[0].is_dir() and len(spec.cases) == TRAIN_CASES
    reference = sites["reference"] / f"{case.case_id}_0000.nii.gz"
    nifti = load_nifti(reference)
    image = load_image(case.images)
    assert image.shape[1:] == nifti.shape
    assert np.array_equal(image[0].numpy(), np.asarray(nifti.dataobj, dtype=np.float32))
    assert np.allclose(image.affine.numpy(), nifti.affine, atol=1e-4)
    assert np.allclose(np.asarray(image.meta["pixdim"][1:4]), nifti.header.get_zooms()[:3], atol=1e-4)
    stored = pydicom.dcmread(open_series(case.images[0]).files[0])  # the first slice along the normal
    assert float(stored.RescaleSlope) == SLOPE != 1
    assert not np.array_equal(stored.pixel_array, image[0, :, :, 0].numpy().T)  # the slope is applied ...
    assert np.array_equal(stored.pixel_array * SLOPE + INTERCEPT, image[0, :, :, 0].numpy().T)  # ... exactly
    # The whole pipeline (RAS, crop, resampling) gives the NIfTI's arrays from the series.
    plan = Plan((1.5, 1.5, 1.5), (16, 16, 16), (ChannelNorm("zscore"),), SHAPE)
    from_dicom = prepare_case(case, plan)
    from_nifti = prepare_case(Case(case.case_id, (reference,), case.labels), plan)
    assert all(np.array_equal(a, b) for a, b in zip(from_dicom, from_nifti, strict=True))
    assert set(read_case((IMAGE, LABEL))({IMAGE: case.images, LABEL: case.label})[IMAGE].meta) <= {
        "original_affine",
        "filename_or_obj",
        "space",
        "pixdim",
        "affine",
        "original_channel_dim",
    }


@pytest.mark.simulation
def test_a_round_on_a_dicom_site_and_a_seg_on_the_source_voxels(sites, own_run, tmp_path, capsys):
    run = own_run
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {e["round"] for e in events if e["event"] == "train" and e["site"] == "dicom"} == {1, 2}
    cached = [p.parent.name for p in (run / "sites" / "dicom" / "cache").glob("plan-*/*/image.npy")]
    assert len(cached) >= TRAIN_CASES - 1
    case = read_dataset(sites["dicom"]).cases[0]
    series = case.images[0]
    site_yaml = site_yaml_of(run, "dicom")
    out = tmp_path / "out"
    common = ["predict", "--config", str(site_yaml), "--run", str(run), "--output", str(out)]
    assert client_main([*common, "--input", str(series), "--output-format", "dicom-seg"]) == 0
    assert (
        client_main(
            [*common, "--input", str(sites["reference"] / f"{case.case_id}_0000.nii.gz"), "--output-names", "nnunet"]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{case.case_id}_seg.dcm", f"{case.case_id}.nii.gz"])
    from_nifti = np.asarray(load_nifti(out / f"{case.case_id}.nii.gz").dataobj)
    assert from_nifti.any(), "the model found foreground: the comparison below means something"

    seg = hd.seg.segread(out / f"{case.case_id}_seg.dcm")
    source = open_series(series)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.references.series_uid
    assert seg.StudyInstanceUID == source.references.study_uid
    assert seg.FrameOfReferenceUID == source.references.frame_of_reference_uid
    labels = read_dataset(sites["dicom"]).labels
    assert {d.SegmentLabel: d.SegmentNumber for d in seg.SegmentSequence} == {
        name: value for name, value in labels.items() if value > 0
    }
    positions = {uid: pos for uid, pos in zip(source.references.sop_instance_uids, source.positions, strict=True)}
    for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame lies on the slice it references
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], positions[uid], atol=1e-3
        )
    pixels = seg.get_pixels_by_source_instance(
        list(source.references.sop_instance_uids), combine_segments=True, assert_missing_frames_are_empty=True
    )
    assert np.array_equal(np.transpose(pixels, (2, 1, 0)), from_nifti)
    assert np.array_equal(load_label(out / f"{case.case_id}_seg.dcm", series)[0].numpy(), from_nifti)

    # Nothing identifying reached the cache, the metrics, the logs or the SEG beyond the references it needs.
    assert planted_in(source.files[0]) == list(IDENTITY.values()), "the scan finds what was planted"
    uids = _series_uids(series)
    leaks = {str(p.relative_to(run)): found for p in run.rglob("*") if p.is_file() and (found := planted_in(p, uids))}
    assert leaks == {}
    assert planted_in(out / f"{case.case_id}_seg.dcm") == []
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "ReferringPhysicianName",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
    ):
        assert str(seg.get(keyword, "")) == "", keyword
    assert not {"InstitutionName", "OperatorsName", "PatientAge", "StationName", "SeriesDescription"} & set(seg.dir())


def _check_site(root: Path, channel: str = "T2") -> Path:
    """Five cases of one-channel DICOM series, each with its NIfTI label; a test breaks them one by one."""
    meta = {"channel_names": {"0": channel}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    affine = double_oblique(np.array([1.0, 1.2, 2.0]))
    for i in range(5):
        image, label = phantom(seed=i)
        write_series(image, affine, root / "imagesTr" / f"case_{i}_0000", series_number=3)
        save(label, affine, root / "labelsTr" / f"case_{i}.nii.gz")
    return root


def test_check_names_a_mixed_folder_a_missing_slice_a_localizer_and_a_wrong_modality(tmp_path, capsys):
    root = _check_site(tmp_path / "site")
    assert check_dataset(root).ok, "the intact series pass"
    images = root / "imagesTr"
    image, _ = phantom(seed=9)
    affine = double_oblique(np.array([1.0, 1.2, 2.0]))
    write_series(image, affine, images / "case_1_0000", series_number=4)  # a second series in the same folder
    shutil.rmtree(images / "case_2_0000")
    write_series(image, affine, images / "case_2_0000", skip=(7,))
    shutil.rmtree(images / "case_3_0000")
    write_series(image, affine, images / "case_3_0000", localizer=True)
    shutil.rmtree(images / "case_4_0000")
    write_series(image, affine, images / "case_4_0000", modality="CT")
    report = check_dataset(root)
    found = {f.file: f.problem for f in report.problems}
    assert set(found) == {f"imagesTr/case_{i}_0000" for i in (1, 2, 3, 4)}
    assert "mixes 2 series" in found["imagesTr/case_1_0000"] and "own folder" in found["imagesTr/case_1_0000"]
    assert "1 slice(s) missing (after slice 7" in found["imagesTr/case_2_0000"]
    assert "localizer" in found["imagesTr/case_3_0000"]
    assert "Modality CT" in found["imagesTr/case_4_0000"] and "'T2' (MR)" in found["imagesTr/case_4_0000"]
    assert client_main(["check", "--data-dir", str(root)]) == 1
    said = capsys.readouterr().out
    assert "imagesTr/case_2_0000: 1 slice(s) missing" in said and "export the whole series again" in said


def test_a_ct_channel_accepts_a_ct_series(tmp_path):
    root = _check_site(tmp_path / "site", channel="CT")
    assert {f.file for f in check_dataset(root).problems} == {f"imagesTr/case_{i}_0000" for i in range(5)}
    for i in range(5):
        shutil.rmtree(root / "imagesTr" / f"case_{i}_0000")
        write_series(
            phantom(seed=i)[0],
            double_oblique(np.array([1.0, 1.2, 2.0])),
            root / "imagesTr" / f"case_{i}_0000",
            modality="CT",
        )
    assert check_dataset(root).ok


def test_uneven_slices_are_named(tmp_path):
    root = _check_site(tmp_path / "site")
    moved = open_series(root / "imagesTr" / "case_0_0000").files[5]
    ds = pydicom.dcmread(moved)
    normal = np.cross(*np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3))
    ds.ImagePositionPatient = [float(v) for v in np.array(ds.ImagePositionPatient, dtype=float) + 0.6 * normal]
    ds.save_as(moved)
    (problem,) = check_dataset(root).problems
    assert problem.file == "imagesTr/case_0_0000" and "uneven slice spacing (1.4 to 2.6 mm)" in problem.problem


def test_a_dicom_seg_label_trains_like_its_nifti(tmp_path):
    from client.dicom_seg import write_dicom_seg

    root = _check_site(tmp_path / "site")
    case = read_dataset(root).case("case_0")
    nifti_label = case.label
    write_dicom_seg(
        np.asarray(load_nifti(nifti_label).dataobj),
        open_series(case.images[0]),
        {"background": 0, "lesion": 1},
        2,
        root / "labelsTr" / "case_0.dcm",
        "test",
    )
    with pytest.raises(ValueError, match="has two labels, case_0.nii.gz and case_0.dcm"):
        read_dataset(root)
    moved = tmp_path / "case_0.nii.gz"
    shutil.move(nifti_label, moved)
    spec = read_dataset(root)
    assert spec.case("case_0").label == root / "labelsTr" / "case_0.dcm"
    assert check_dataset(root).ok
    plan = Plan((1.5, 1.5, 1.5), (16, 16, 16), (ChannelNorm("zscore"),), SHAPE)
    _, from_seg = prepare_case(spec.case("case_0"), plan)
    _, from_nifti = prepare_case(Case("case_0", case.images, (moved,)), plan)
    assert from_seg.any() and np.array_equal(from_seg, from_nifti)
