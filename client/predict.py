"""Segment scans at the site with the federation's global weights and the site's own norm tensors.

    fedseg-client predict --config site.yaml --run RUN_DIR [--weights best|last|round-N] [--personalized]
                          --input scan.nii.gz|dicom-series/|folder --output out/
                          [--output-format nifti|dicom-seg] [--output-names fedseg|nnunet] [--strict]
    fedseg-client predict --model MODEL_DIR --input scan.nii.gz|dicom-series/|folder --output out/

``RUN_DIR`` is what the coordinating centre hands to a hospital from a run
(``fedseg-server site-package``): its ``config.yaml`` (the model),
``plan.json`` (preprocessing) and ``checkpoints/`` (global weights). The round
is the centre's best, else its last (``--weights`` picks another; the same
rule in export and report), and the site's own normalization tensors are
those of that round of that run, from its state directory;
``--personalized`` uses the personalized copy cross-site evaluation scored.
``MODEL_DIR`` is a folder written by ``fedseg-client export`` and holds all of
that itself. Each scan is preprocessed by the plan, segmented by sliding
windows on ``train.device`` in ``train.precision``, and the integer label map
is mapped back (resampling, crop, orientation) onto exactly the input's grid:
same shape, same affine, same orientation.

Windows are visited slab by slab along the last axis, and logits are kept
only for the slab in progress (one window deep), so memory stays near the
size of the input; a window whose input is constant (air clipped by the CT
plan, zero padding) gives the same output wherever it lies and is computed
once. A hospital that never trained has no BatchNorm statistics of its own:
prediction then first re-estimates them on its unlabeled scans
(common.norm_adapt; ``--adapt-norm`` / ``--no-adapt-norm`` force it either way).
Off by default: ``--tta`` (mirroring), ``--probabilities`` (a 4D softmax
file) and ``--largest-component`` (per-class largest connected component).
Written files carry the geometry only, never the input header's text fields.

An input is a NIfTI file, a DICOM series folder (common/dicom_series.py), or a
folder of either. Before anything is segmented, every input is compared with
what the model was trained on (client/predict_inputs.py): a different channel
count is refused, a different modality is warned about (``--strict``
refuses). ``--output-format dicom-seg`` writes a DICOM Segmentation that
references a DICOM input's series (client/dicom_seg.py); ``--output-names
nnunet`` names outputs ``<case>.nii.gz`` as nnU-Net does, instead of
``<case>_seg.nii.gz``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.cli import add_weights_argument
from common.dataset import DICOM_SEG_ENDING, NIFTI_ENDINGS, DatasetError, channel_groups

if TYPE_CHECKING:  # torch, MONAI and nibabel are imported where they are used, so --help stays fast
    import nibabel as nib
    from monai.data import MetaTensor
    from torch import nn

    from common.config import FedsegConfig
    from common.plan import Plan

    from .slab_inferer import InferenceOptions

log = logging.getLogger("fedseg.client")
SUFFIX = "_seg"
PROB_SUFFIX = "_prob"
NIFTI_OUT_ENDING = ".nii.gz"
"""The ending of a NIfTI written for a DICOM input (a NIfTI input keeps its own)."""
OUTPUT_FORMATS = ("nifti", "dicom-seg")
OUTPUT_NAMES = ("fedseg", "nnunet")


def label_to_file_grid(label: np.ndarray, image: MetaTensor) -> np.ndarray:
    """A plan-space label map back onto the input file's voxel grid (nearest neighbour, in uint8).

    The result may be a strided view (flipped axes); nibabel writes it as it is.
    """
    from common.reading import LABEL, to_file_grid

    return to_file_grid(label[None], image, LABEL).numpy()[0]


def probabilities_to_file_grid(probabilities: np.ndarray, image: MetaTensor) -> np.ndarray:
    """Plan-space probabilities [C, ...] -> [X, Y, Z, C] float32 on the input's grid (trilinear).

    Outside the nonzero crop the image was empty: background there has probability 1 (the
    inverse pads with 0, so the crop's place is found by sending a volume of ones back).
    """
    import torch

    from common.reading import IMAGE, LABEL, to_file_grid

    back = to_file_grid(torch.from_numpy(probabilities).float(), image, IMAGE).as_tensor()
    ones = torch.ones((1, *probabilities.shape[1:]), dtype=torch.uint8)
    outside = to_file_grid(ones, image, LABEL).as_tensor()[0] == 0
    back[0][outside] = 1.0
    return np.ascontiguousarray(np.moveaxis(back.numpy(), 0, -1))


def output_header(source: nib.Nifti1Header | None, dtype: type | np.dtype) -> nib.Nifti1Header:
    """A fresh header for a file fedseg writes: the data type and the source's units (mm for DICOM), nothing else.

    The source's free-text fields (descrip, aux_file, intent_name, db_name) and
    extensions can carry patient data, so they are never copied; the geometry
    comes from the affine given to the image.
    """
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_xyzt_units(*(source.get_xyzt_units() if source is not None else ("mm", "sec")))
    return header


def write_nifti(
    array: np.ndarray, affine: np.ndarray, source: nib.Nifti1Header | None, path: Path, dtype: type | None = None
) -> None:
    """Write ``array`` on the input's grid (scanner qform and sform from its affine), stored as ``dtype``."""
    import nibabel as nib

    from common.nifti_out import save_nifti

    out = nib.Nifti1Image(array, affine, output_header(source, dtype or array.dtype))
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    save_nifti(out, path)


def keep_largest_components(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Only the largest connected component of each foreground class (MONAI's KeepLargestConnectedComponent)."""
    import torch
    from monai.transforms import KeepLargestConnectedComponent

    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)), is_onehot=False, independent=True)
    return np.asarray(keep(torch.from_numpy(np.ascontiguousarray(label))[None]))[0].astype(np.uint8, copy=False)


def probability_path(out_path: Path) -> Path:
    """case_seg.nii.gz (or case.nii.gz, case_seg.dcm) -> case_prob.nii.gz, next to the label map."""
    ending = next((e for e in (*NIFTI_ENDINGS, DICOM_SEG_ENDING) if out_path.name.endswith(e)), "")
    stem = out_path.name[: len(out_path.name) - len(ending)].removesuffix(SUFFIX)
    return out_path.with_name(f"{stem}{PROB_SUFFIX}{ending if ending != DICOM_SEG_ENDING else NIFTI_OUT_ENDING}")


def predict_file(
    path: Path | tuple[Path, ...],
    out_path: Path,
    model: nn.Module,
    plan: Plan,
    num_classes: int,
    options: InferenceOptions | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Segment one scan (or one case's channel files) and write its label map (and probabilities) on the
    input's grid; ``options`` None: InferenceOptions' defaults."""
    from common.dicom_series import Series, open_series
    from common.preprocess import prepare_image
    from common.reading import load_nifti, without_voxels

    from .slab_inferer import InferenceOptions, SlabInferer

    options = InferenceOptions() if options is None else options
    paths = path if isinstance(path, tuple) else (path,)
    image = prepare_image(paths, plan, file_layout=True)
    inferer = SlabInferer(model, plan.patch_size, num_classes, options, progress=progress)
    segmentation = inferer.segment(image.as_tensor())  # a plain tensor: MetaTensor's bookkeeping costs per op
    image = without_voxels(image)
    label = label_to_file_grid(segmentation.label, image)
    series: Series | None = None
    source: nib.Nifti1Header | None = None
    shape: tuple[int, ...]
    if paths[0].is_dir():
        series = open_series(paths[0])
        shape = series.shape
    else:
        source = load_nifti(paths[0]).header
        shape = tuple(int(s) for s in source.get_data_shape()[:3])
    if label.shape != shape:
        raise RuntimeError(f"{path}: prediction shape {label.shape} differs from the input's {shape}")
    if options.largest_component:
        label = keep_largest_components(label, num_classes)
    affine = np.asarray(image.meta["original_affine"], dtype=float)
    if options.output_format == "dicom-seg":
        from importlib.metadata import version

        from .dicom_seg import write_dicom_seg

        if series is None:  # check_inputs refuses it before anything is segmented
            raise DatasetError(f"{paths[0]}: --output-format dicom-seg needs a DICOM series input")
        write_dicom_seg(label, series, dict(options.labels), num_classes, out_path, version("fedseg"))
    else:
        write_nifti(label, affine, source, out_path)
    if segmentation.probabilities is not None:
        probabilities = probabilities_to_file_grid(segmentation.probabilities, image)
        # NIfTI has no float16: uint8 with a 1/255 scale factor, which nibabel applies when reading
        write_nifti(probabilities, affine, source, probability_path(out_path), dtype=np.uint8)
    return label


def scans(source: Path) -> list[Path]:
    """The inputs: a scan, a DICOM series folder, or a folder of scans and series folders."""
    from common.dicom_series import is_series_folder  # pydicom: imported when inputs are listed, not for --help

    if source.is_file() or is_series_folder(source):
        return [source]
    if source.is_dir():
        found = sorted(
            p
            for p in source.iterdir()
            if not p.name.startswith(".") and (p.name.endswith(NIFTI_ENDINGS) and p.is_file() or is_series_folder(p))
        )
        if found:
            return found
    from common.cli import UserError

    raise UserError(
        f"{source}: no .nii or .nii.gz scan or DICOM series folder to segment (give a file, a series "
        "folder, or a folder of them)."
    )


def output_name(scan: Path, names: str = "fedseg", output_format: str = "nifti") -> str:
    """case_0000.nii.gz -> case_seg.nii.gz (``nnunet``: case.nii.gz); a series folder gives .nii.gz or .dcm.

    A NIfTI input keeps its ending; a DICOM-SEG ends in .dcm.
    """
    ending = "" if scan.is_dir() else next(e for e in NIFTI_ENDINGS if scan.name.endswith(e))
    stem = scan.name[: len(scan.name) - len(ending)]
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        stem = stem[:-5]
    ending = DICOM_SEG_ENDING if output_format == "dicom-seg" else ending or NIFTI_OUT_ENDING
    return f"{stem}{'' if names == 'nnunet' else SUFFIX}{ending}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--run",
        type=Path,
        help="Run folder from the centre (fedseg-server site-package): config.yaml, plan.json, checkpoints/.",
    )
    source.add_argument(
        "--model",
        type=Path,
        help="A model folder written by `fedseg-client export` (no run folder or site state needed).",
    )
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        help="A scan (.nii/.nii.gz), a DICOM series folder, or a folder of scans and series folders.",
    )
    parser.add_argument("--output", type=Path, required=True, help="Folder for the label maps (<case>_seg.nii.gz).")
    parser.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default="nifti",
        help="nifti (default), or dicom-seg: a DICOM Segmentation referencing the input series "
        "(DICOM inputs only; no patient attribute is copied).",
    )
    parser.add_argument(
        "--output-names",
        choices=OUTPUT_NAMES,
        default="fedseg",
        help="fedseg: <case>_seg.nii.gz (default); nnunet: <case>.nii.gz as nnU-Net writes them.",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="Refuse an input whose modality differs from what the model was trained on (default: "
        "warn and segment it).",
    )
    add_weights_argument(parser, "; with --personalized, the personalized copy's")
    parser.add_argument(
        "--personalized",
        action="store_true",
        help="With --run: the personalized copy this site's cross-site evaluation fine-tuned and "
        "scored (kept in the run's site state).",
    )
    parser.add_argument(
        "--overlap", type=float, default=None, help="Sliding-window overlap (default: train.sw_overlap)."
    )
    parser.add_argument(
        "--adapt-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="First re-estimate the BatchNorm statistics on these unlabeled scans (AdaBN). Default: "
        "only for a site with no norm tensors of its own (it never trained in this run).",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="Test-time mirroring: average the 8 flipped copies of every window (8x slower).",
    )
    parser.add_argument(
        "--probabilities",
        action="store_true",
        help="Also write <case>_prob.nii.gz: the softmax, one volume per class (4D).",
    )
    parser.add_argument(
        "--largest-component",
        action="store_true",
        help="Keep only the largest connected component of each foreground class.",
    )


def inference_options(args: argparse.Namespace, model_cfg: FedsegConfig, site_cfg: FedsegConfig) -> InferenceOptions:
    """The model's sliding-window settings, the site's device and precision, and the command's flags."""
    from common.device import compute_for, with_site_compute

    from .slab_inferer import InferenceOptions

    train = with_site_compute(model_cfg.train, site_cfg.train)
    return InferenceOptions(
        overlap=train.sw_overlap if args.overlap is None else args.overlap,
        batch_size=train.sw_batch_size,
        compute=compute_for(train),
        mirror=args.tta,
        probabilities=args.probabilities,
        largest_component=args.largest_component,
        output_format=args.output_format,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from common.cli import UserError, config_from_args
    from common.dicom_series import DicomSeriesError
    from common.norm_adapt import adapt_norm, has_batch_norm
    from common.preprocess import prepare_image

    from .site_model import load_run_model, load_site_model

    cfg = config_from_args(args)
    torch.set_num_threads(cfg.site.torch_threads)
    state_root = Path(cfg.site.state_dir) if cfg.site.state_dir else None
    if args.model is not None:
        if args.weights is not None or args.personalized:
            raise UserError(
                "--weights and --personalized go with --run; an exported --model folder holds its own weights."
            )
        model, plan, model_cfg = load_site_model(args.model)
        own = True
    else:
        loaded = load_run_model(
            args.run,
            args.weights,
            state_root,
            personalized=args.personalized,
            missing_local="quiet" if args.adapt_norm is not False else "warn",
        )
        model, plan, model_cfg, own = loaded.model, loaded.plan, loaded.cfg, loaded.own
        print(f"model: {loaded.describe()}")
    adapt = args.adapt_norm if args.adapt_norm is not None else not own and has_batch_norm(model)
    if adapt and args.adapt_norm is None:
        print(
            "this site has no BatchNorm statistics of its own for this model (it never trained in this run): "
            "re-estimating them on these scans first (--no-adapt-norm to skip)"
        )
    options = inference_options(args, model_cfg, cfg)
    if args.output_format == "dicom-seg":
        labels = _model_labels(args, cfg, model_cfg.model.out_channels)
        options = dataclasses.replace(options, labels=tuple(labels.items()))
    try:
        cases = channel_groups(scans(args.input), model_cfg.model.in_channels)
        check_inputs(cases, plan, model_cfg.model.in_channels, args.output_format, args.strict)
    except (DatasetError, DicomSeriesError) as err:
        raise UserError(str(err)) from err
    args.output.mkdir(parents=True, exist_ok=True)
    if adapt:
        train = model_cfg.train
        if train.adapt_norm_steps < 1:
            raise UserError("--adapt-norm needs train.adapt_norm_steps >= 1 in the model's config.")
        images = [prepare_image(paths, plan).numpy() for paths in cases.values()]
        data = plan.data_config(model_cfg.data)
        if adapt_norm(
            model, images, data, train.adapt_norm_steps, train.batch_size, train.seed, options.compute.device
        ):
            print(f"re-estimated the BatchNorm statistics on {len(images)} scan(s)")
        else:
            print("the model has no BatchNorm layer: nothing to adapt, it is used as it arrives")
    for i, paths in enumerate(cases.values(), 1):
        out = args.output / output_name(paths[0], args.output_names, args.output_format)
        print(f"[{i}/{len(cases)}] {paths[0].name} -> {out}")
        try:
            predict_file(paths, out, model, plan, model_cfg.model.out_channels, options, progress=True)
        except DicomSeriesError as err:  # pixel data that cannot be decoded: the cases before it are written
            raise UserError(str(err)) from err
    return 0


def _model_labels(args: argparse.Namespace, cfg: FedsegConfig, num_classes: int) -> dict[str, int]:
    """Label name -> value for a DICOM-SEG's segments: the exported folder's labels.json, else the site's dataset."""
    import json

    from common.runs import LABELS_FILE

    from .site_model import label_names

    if args.model is not None and (args.model / LABELS_FILE).is_file():
        return {str(k): int(v) for k, v in json.loads((args.model / LABELS_FILE).read_text()).items()}
    return label_names(cfg, num_classes)


def check_inputs(
    cases: dict[str, tuple[Path, ...]], plan: Plan, in_channels: int, output_format: str, strict: bool
) -> None:
    """Before segmenting: refuse what cannot run or be written, warn (``strict``: refuse) about a modality the
    model was not trained on. Raises DatasetError naming the file."""
    from .predict_inputs import channel_count, input_mismatches

    for paths in cases.values():
        if (found := channel_count(paths)) != in_channels:
            raise DatasetError(
                f"{paths[0]}: {found} channel(s), the model was trained on {in_channels}; it cannot segment this input."
            )
        if output_format == "dicom-seg" and not paths[0].is_dir():
            raise DatasetError(
                f"{paths[0]}: --output-format dicom-seg needs a DICOM series input (a SEG references "
                "its source images); use the default NIfTI output for a NIfTI scan."
            )
    mismatches = [m for paths in cases.values() for m in input_mismatches(paths, plan)]
    for line in mismatches:
        log.warning("input differs from the model's training data: %s", line)
        print(f"WARNING: {line}", file=sys.stderr)
    if mismatches and strict:
        raise DatasetError(
            f"--strict: {len(mismatches)} input(s) differ from what the model was trained on:\n  "
            + "\n  ".join(mismatches)
            + "\n(drop --strict to segment them anyway)"
        )
