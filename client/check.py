"""Preflight check of a site's data: open every case and report what would break training.

Every file is opened and read in full, and each defect is reported with the
file's name: unreadable or truncated files, an image without a label or a
label without an image, image/label shapes or affines that disagree, labels
that are not integers or not declared in dataset.json, NaN or Inf voxels,
empty labels, odd orientation or spacing, and a numTraining in dataset.json
that disagrees with the cases found. A DICOM series folder is checked before
it is read: a folder that mixes series, a localizer, missing or uneven slices,
and a Modality that differs from what the channel's name in dataset.json
implies (common/dicom_series.py) are named with the folder and the fix.
Labelled test cases (imagesTs/labelsTs)
are checked like training cases. A summary table
follows (cases, spacing and shape ranges, label voxel fractions). Nothing is
modified. The exit code is 1 when training would fail (any problem), 0
otherwise (warnings only). The ClientApp runs the same check before it uses a
dataset (cached until a file changes) and refuses a broken one.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.dataset import DATASET_JSON, Case, DatasetError, DatasetSpec, read_dataset

if TYPE_CHECKING:
    from common.reading import Voxels

log = logging.getLogger("fedseg.client")

AFFINE_ATOL_MM = 1e-3
"""Image and label affines may differ by float noise only."""
OBLIQUE_TOLERANCE = 1e-3
SPACING_RANGE_MM = (0.05, 20.0)
"""Spacings outside this range are almost certainly a header in the wrong unit."""
MAX_SPACING_RATIO = 10.0
MAX_LISTED = 20
"""Problems listed in the error a refused dataset raises (all of them go to the log and the CLI)."""
EXIT_OK, EXIT_BROKEN = 0, 1


@dataclass(frozen=True)
class Finding:
    file: str
    problem: str
    fatal: bool

    def line(self) -> str:
        return f"{'PROBLEM' if self.fatal else 'warning'}  {self.file}: {self.problem}"


@dataclass
class CaseInfo:
    """Per-case facts for the summary table; never sent anywhere."""

    spacing: np.ndarray
    shape: tuple[int, ...]
    fractions: np.ndarray


@dataclass
class CheckReport:
    root: Path
    spec: DatasetSpec | None
    findings: list[Finding] = field(default_factory=list)
    cases: list[CaseInfo] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.fatal for f in self.findings)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.fatal]

    def message(self) -> str:
        """The error a refused dataset raises: every problem (up to MAX_LISTED) with its file."""
        lines = [f.line() for f in self.problems]
        more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
        return (
            f"the dataset in {self.root} would fail training ({len(lines)} problem(s)); "
            "fix these files and run `fedseg-client check --config site.yaml`:\n  "
            + "\n  ".join(lines[:MAX_LISTED])
            + more
        )

    def verdict(self) -> dict[str, bool | str]:
        """What the site daemon needs of the report (client/daemon.py), as plain data that can cross a pipe."""
        return {"ok": self.ok, "message": self.message(), "table": self.table()}

    def table(self) -> str:
        spec = self.spec
        if spec is None:
            return "\n".join(f.line() for f in self.findings)
        tests = f" + {len(spec.test_cases)} labelled test case(s)" if spec.test_cases else ""
        out = [
            f"dataset {self.root} ({spec.layout} layout): {len(spec.cases)} case(s){tests}, {spec.num_channels} "
            f"channel(s) {list(spec.channel_names.values())}, {spec.num_classes} classes, "
            f"{len(spec.annotators)} annotator(s)"
        ]
        out += ["  " + f.line() for f in self.findings]
        if self.cases:
            spacing = np.stack([c.spacing for c in self.cases])
            shapes = np.array([c.shape for c in self.cases])
            fractions = np.stack([c.fractions for c in self.cases])
            fmt = "x".join
            out.append(f"  {'quantity':<28}{'min':>22}{'max':>22}")
            out.append(
                f"  {'spacing (mm, R x A x S)':<28}{fmt(f'{v:.2f}' for v in spacing.min(0)):>22}"
                f"{fmt(f'{v:.2f}' for v in spacing.max(0)):>22}"
            )
            out.append(
                f"  {'shape (voxels, R x A x S)':<28}{fmt(str(v) for v in shapes.min(0)):>22}"
                f"{fmt(str(v) for v in shapes.max(0)):>22}"
            )
            names = {v: k for k, v in spec.labels.items()}
            for c in range(1, fractions.shape[1]):
                label = f"label {c} '{names.get(c, '?')}' voxels"
                out.append(
                    f"  {label:<28}{fractions[:, c].min():>21.4%} {fractions[:, c].max():>21.4%}"
                    f"  (mean {fractions[:, c].mean():.4%})"
                )
        n_warn = len(self.findings) - len(self.problems)
        verdict = "OK: the data can be read" if self.ok else "training would FAIL"
        out.append(f"result: {len(self.problems)} problem(s), {n_warn} warning(s): {verdict}")
        return "\n".join(out)


def _oblique(affine: np.ndarray) -> bool:
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.any((np.abs(columns) > OBLIQUE_TOLERANCE) & (np.abs(columns) < 1 - OBLIQUE_TOLERANCE)))


def _geometry_findings(name: str, img: Voxels) -> list[Finding]:
    zooms = img.zooms
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        return [Finding(name, f"invalid voxel spacing {zooms.tolist()} or singular affine", True)]
    found = []
    low, high = SPACING_RANGE_MM
    if np.any(zooms < low) or np.any(zooms > high):
        found.append(
            Finding(
                name,
                f"odd spacing {zooms.round(4).tolist()} mm (outside {low}-{high} mm: is the header in the wrong unit?)",
                False,
            )
        )
    if zooms.max() / zooms.min() > MAX_SPACING_RATIO:
        found.append(Finding(name, f"very anisotropic spacing {zooms.round(3).tolist()} mm", False))
    if _oblique(img.affine):
        import nibabel as nib

        codes = "".join(nib.aff2axcodes(img.affine))
        found.append(Finding(name, f"oblique orientation (closest {codes}); resampled in voxel space", False))
    return found


def series_findings(name: str, folder: Path, channel_name: str) -> list[Finding]:
    """A DICOM series folder's defects (common/dicom_series.py), and a Modality its channel's name rules out."""
    from common.dicom_series import expected_modality, inspect_series  # pydicom: imported when a series is read

    series, problems = inspect_series(folder)
    found = [Finding(name, problem, True) for problem in problems]
    expected = expected_modality(channel_name)
    if series is not None and expected is not None and series.modality != expected:
        found.append(
            Finding(
                name,
                f"DICOM Modality {series.modality or '(none)'}, but dataset.json names this "
                f"channel '{channel_name}' ({expected}); move the series to the right channel or "
                "case, or fix channel_names",
                True,
            )
        )
    return found


def _open_all(paths: tuple[Path, ...], series: Path | None, rel) -> tuple[list[tuple[Path, Voxels]], list[Finding]]:
    from common.reading import open_voxels  # MONAI: imported when a case is read, not for --help

    opened, found = [], []
    for path in paths:
        try:
            opened.append((path, open_voxels(path, series)))
        except Exception as err:  # nibabel, pydicom and highdicom raise many kinds for broken files
            found.append(Finding(rel(path), f"unreadable or truncated ({type(err).__name__}: {err})", True))
    return opened, found


def check_case(case: Case, spec: DatasetSpec) -> tuple[list[Finding], CaseInfo | None]:
    """Every defect of one case, and its facts for the summary when it is readable."""
    root = spec.root
    rel = lambda p: str(p.relative_to(root)) if p.is_relative_to(root) else str(p)  # noqa: E731
    names = [spec.channel_names[k] for k in sorted(spec.channel_names, key=int)]
    found = [
        f
        for c, path in enumerate(case.images)
        if path.is_dir()
        for f in series_findings(rel(path), path, names[c] if c < len(names) else "")
    ]
    if found:
        return found, None
    series = case.images[0] if case.images[0].is_dir() else None
    opened_images, found = _open_all(case.images, series, rel)
    opened_labels, label_found = _open_all(case.labels, series, rel)
    found += label_found
    if found:
        return found, None
    images = [(path, v, v.data) for path, v in opened_images]
    labels = [(path, v, v.data) for path, v in opened_labels]
    ref_path, ref_img, ref_data = images[0]
    ref_shape = ref_data.shape[:3]
    channels = sum(1 if d.ndim == 3 else d.shape[3] for _, _, d in images)
    if channels != spec.num_channels:
        found.append(Finding(rel(ref_path), f"{channels} channel(s), dataset.json declares {spec.num_channels}", True))
    found += _geometry_findings(rel(ref_path), ref_img)
    for path, _img, data in images:
        if not np.all(np.isfinite(data)):
            bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
            found.append(Finding(rel(path), f"{bad} NaN/Inf voxel(s)", True))
    allowed = set(spec.labels.values())
    fractions = np.zeros(spec.num_classes)
    for path, img, data in [*images[1:], *labels]:
        if data.shape[:3] != ref_shape:
            found.append(Finding(rel(path), f"shape {data.shape[:3]} differs from {rel(ref_path)} {ref_shape}", True))
        elif not np.allclose(img.affine, ref_img.affine, atol=AFFINE_ATOL_MM):
            found.append(
                Finding(
                    rel(path),
                    f"affine differs from {rel(ref_path)} (max difference "
                    f"{np.abs(img.affine - ref_img.affine).max():.4g})",
                    True,
                )
            )
    for path, _, data in labels:
        if data.ndim != 3:
            found.append(Finding(rel(path), f"label map has {data.ndim} dimensions, expected 3", True))
            continue
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            found.append(Finding(rel(path), "label values are not integers", True))
            continue
        values = np.unique(data).astype(np.int64)
        unknown = sorted(set(values.tolist()) - allowed)
        if unknown:
            found.append(
                Finding(rel(path), f"label values {unknown[:10]} not in dataset.json labels {sorted(allowed)}", True)
            )
            continue
        if path == case.label:
            fractions = np.bincount(data.astype(np.int64).ravel(), minlength=spec.num_classes) / data.size
            if not np.any(data > 0):
                found.append(Finding(rel(path), "empty label (no foreground voxels)", False))
    from common.reading import ras_axes

    order = ras_axes(ref_img.affine)
    info = CaseInfo(ref_img.zooms[order], tuple(int(v) for v in np.asarray(ref_shape)[order]), fractions)
    return found, info


def inventory_findings(spec: DatasetSpec) -> list[Finding]:
    """Files without a partner (never trained on, so an annotation is probably lost) and a stale numTraining."""
    found = [Finding(u.file, u.problem, True) for u in spec.unpaired]
    if spec.num_training is not None and spec.num_training != len(spec.cases):
        found.append(
            Finding(
                DATASET_JSON,
                f"numTraining is {spec.num_training} but {len(spec.cases)} complete training case(s) were found",
                False,
            )
        )
    return found


def check_dataset(root: Path | str) -> CheckReport:
    """Open every case of the dataset at ``root``; the report lists every defect."""
    root = Path(root)
    try:
        spec = read_dataset(root)
    except DatasetError as err:
        return CheckReport(root, None, [Finding(str(root), str(err), True)])
    report = CheckReport(root, spec)
    report.findings += inventory_findings(spec)
    for case in (*spec.cases, *spec.test_cases):
        found, info = check_case(case, spec)
        report.findings += found
        if info is not None:
            report.cases.append(info)
    if report.cases and not any(np.any(c.fractions[1:] > 0) for c in report.cases):
        report.findings.append(Finding(str(root), "every label is empty: there is nothing to learn", True))
    return report


def dataset_stamp(root: Path | str) -> str:
    """Changes whenever a file of the dataset is added, removed, replaced or touched."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def preflight(root: Path | str, state_info: dict) -> tuple[str, CheckReport | None]:
    """Check the dataset unless this exact dataset passed before (stamp in site.json).

    Returns (stamp, report or None when the cached verdict holds); raises
    DatasetError with every problem listed when training would fail.
    """
    stamp = dataset_stamp(root)
    if state_info.get("checked_stamp") == stamp:
        return stamp, None
    report = check_dataset(root)
    for finding in report.findings:
        log.log(logging.ERROR if finding.fatal else logging.WARNING, "check: %s", finding.line())
    if not report.ok:
        raise DatasetError(report.message())
    return stamp, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="Dataset folder to check (default: site.data_dir).")


def run(args: argparse.Namespace) -> int:
    from common.cli import UserError, config_from_args

    cfg = config_from_args(args)
    root = args.data_dir or (Path(cfg.site.data_dir) if cfg.site.data_dir else None)
    if root is None:
        raise UserError("no dataset to check: set site.data_dir in site.yaml or pass --data-dir.")
    report = check_dataset(root)
    print(report.table())
    if report.spec is None or not report.ok:
        return EXIT_BROKEN
    from .participation import participation

    verdict = participation(cfg, report.spec)
    print("in a run, with this site.yaml:\n" + "\n".join(f"  {line}" for line in verdict.lines))
    print("OK: this site can train" if verdict.trains else "this site would be REFUSED in a run (see above)")
    return EXIT_OK if verdict.trains else EXIT_BROKEN
