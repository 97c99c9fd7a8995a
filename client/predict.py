"""Segment scans at the site with the federation's global weights and the site's own norm tensors.

    fedseg-client predict --config site.yaml --run RUN_DIR --input scan.nii.gz|folder --output out/

``RUN_DIR`` is what the coordinating centre hands to hospitals from a run:
its ``config.yaml`` (the model), ``plan.json`` (preprocessing) and
``checkpoints/best.safetensors`` (global weights; ``--weights`` picks
another). The site's own normalization tensors come from its state directory.
Each scan is preprocessed by the plan, segmented by sliding windows, and the
integer label map is mapped back (resampling, crop, orientation) onto exactly
the input's grid: same shape, same affine, same orientation.

Windows are visited slab by slab along the last axis, and logits are kept
only for the slab in progress (one window deep), so memory stays near the
size of the input; a window whose input is constant (air clipped by the CT
plan, zero padding) gives the same output wherever it lies and is computed
once. ``--adapt-norm`` is for a hospital that never trained: it first adapts
the normalization layers to its own unlabeled scans (common.norm_adapt).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from common.dataset import NIFTI_ENDINGS, DatasetError, channel_groups
from common.nifti_out import save_nifti
from common.plan import PLAN_FILE, Plan
from common.preprocess import Geometry, prepare_image

log = logging.getLogger("fedseg.client")

CHECKPOINT = Path("checkpoints") / "best.safetensors"
RUN_CONFIG = "config.yaml"
SUFFIX = "_seg"
PROGRESS_WIDTH = 30


def _window_starts(size: int, roi: int, step: int) -> list[int]:
    """Window starts along one axis, covering it with the last window flush to its end."""
    if size <= roi:
        return [0]
    starts = list(range(0, size - roi, step))
    return [*starts, size - roi]


class SlabInferer:
    """Sliding-window segmentation with memory bounded by one slab of logits."""

    def __init__(self, model: nn.Module, roi: tuple[int, int, int], overlap: float, num_classes: int,
                 batch_size: int = 1, bf16: bool = False, progress: bool = False) -> None:
        self.model = model
        self.roi = tuple(int(r) for r in roi)
        self.step = tuple(max(1, int(r * (1 - overlap))) for r in self.roi)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.bf16 = bf16
        self.progress = progress
        self._constant: dict[tuple[float, ...], torch.Tensor] = {}

    def _predict(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits per window; constant windows are computed once per value."""
        out: list[torch.Tensor | None] = [None] * len(windows)
        todo = []
        for i, w in enumerate(windows):
            flat = w.flatten(1)
            if bool(torch.all(flat.amax(1) == flat.amin(1))):
                key = tuple(float(v) for v in flat[:, 0])
                if key in self._constant:
                    out[i] = self._constant[key]
                    continue
            todo.append(i)
        for k in range(0, len(todo), self.batch_size):
            chunk = todo[k:k + self.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(torch.stack([windows[i] for i in chunk])).float()
            for i, y in zip(chunk, logits):
                out[i] = y
                flat = windows[i].flatten(1)
                if bool(torch.all(flat.amax(1) == flat.amin(1))):
                    self._constant[tuple(float(v) for v in flat[:, 0])] = y
        return out

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> np.ndarray:
        """image [C, X, Y, Z] -> label [X, Y, Z] uint8."""
        self.model.eval()
        shape = image.shape[1:]
        pad = [max(0, r - s) for r, s in zip(self.roi, shape)]
        if any(pad):
            image = torch.nn.functional.pad(image, [0, pad[2], 0, pad[1], 0, pad[0]])
        size = image.shape[1:]
        rx, ry, rz = self.roi
        xs = _window_starts(size[0], rx, self.step[0])
        ys = _window_starts(size[1], ry, self.step[1])
        zs = _window_starts(size[2], rz, self.step[2])
        label = np.zeros(size, dtype=np.uint8)
        # Summed logits of the slab in progress; the argmax of a sum equals that of MONAI's
        # average (the window count is positive), so no count map is kept.
        logits = torch.zeros((self.num_classes, size[0], size[1], rz))
        base = 0
        started = time.perf_counter()
        for n, z in enumerate(zs):
            if z - base + rz > logits.shape[-1]:
                raise RuntimeError("window order broke the slab buffer; report this as a bug")
            windows, places = [], []
            for x in xs:
                for y in ys:
                    windows.append(image[:, x:x + rx, y:y + ry, z:z + rz])
                    places.append((x, y))
            for (x, y), out in zip(places, self._predict(windows)):
                logits[:, x:x + rx, y:y + ry, z - base:z - base + rz] += out
            done = zs[n + 1] if n + 1 < len(zs) else size[2]
            ready = done - base
            label[..., base:done] = logits[..., :ready].argmax(0).numpy()
            logits[..., : rz - ready] = logits[..., ready:].clone()
            logits[..., rz - ready:] = 0
            base = done
            if self.progress:
                _progress(n + 1, len(zs), time.perf_counter() - started)
        return label[: shape[0], : shape[1], : shape[2]]


def _progress(done: int, total: int, elapsed: float) -> None:
    filled = round(PROGRESS_WIDTH * done / total)
    eta = elapsed / done * (total - done)
    sys.stderr.write(f"\r  [{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}] {done}/{total} slabs, "
                     f"{elapsed:.0f} s, ~{eta:.0f} s left")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def to_original(label: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map a plan-space label map back onto the input file's voxel grid."""
    box_shape = [stop - start for start, stop in geometry.box]
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(label)[None, None].float(), size=box_shape, mode="nearest-exact"
    )[0, 0].numpy().astype(np.uint8)
    ras = np.zeros(geometry.ras_shape, dtype=np.uint8)
    ras[tuple(slice(start, stop) for start, stop in geometry.box)] = resized
    ras_to_file = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(geometry.affine)
    )
    return np.ascontiguousarray(nib.orientations.apply_orientation(ras, ras_to_file))


def predict_file(path: Path | tuple[Path, ...], out_path: Path, model: nn.Module, plan: Plan, num_classes: int,
                 overlap: float, batch_size: int, progress: bool = False, bf16: bool = False) -> np.ndarray:
    """Segment one scan (or one case's channel files) and write its label map on the input's grid;
    ``batch_size`` windows per forward pass."""
    paths = path if isinstance(path, tuple) else (path,)
    image, geometry = prepare_image(paths, plan)
    inferer = SlabInferer(model, plan.patch_size, overlap, num_classes, batch_size, bf16=bf16, progress=progress)
    label = to_original(inferer(image.as_tensor()), geometry)
    del image
    if label.shape != geometry.shape:
        raise RuntimeError(f"{path}: prediction shape {label.shape} differs from the input's {geometry.shape}")
    header = nib.load(str(paths[0])).header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    out = nib.Nifti1Image(label, geometry.affine, header)
    out.set_qform(geometry.affine, code=1)
    out.set_sform(geometry.affine, code=1)
    save_nifti(out, out_path)
    return label


def scans(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        found = sorted(p for p in source.iterdir() if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith("."))
        if found:
            return found
    from common.cli import UserError

    raise UserError(f"{source}: no .nii or .nii.gz scan to segment (give a file or a folder of scans).")


def output_name(scan: Path) -> str:
    """case_0000.nii.gz -> case_seg.nii.gz; the ending is kept."""
    ending = next(e for e in NIFTI_ENDINGS if scan.name.endswith(e))
    stem = scan.name[: -len(ending)]
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        stem = stem[:-5]
    return f"{stem}{SUFFIX}{ending}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True,
                        help="Run folder from the centre: config.yaml, plan.json, checkpoints/best.safetensors.")
    parser.add_argument("--input", type=Path, required=True, help="A scan (.nii/.nii.gz) or a folder of scans.")
    parser.add_argument("--output", type=Path, required=True, help="Folder for the label maps (<case>_seg.nii.gz).")
    parser.add_argument("--weights", type=Path, help="Global weights (default: RUN/checkpoints/best.safetensors).")
    parser.add_argument("--overlap", type=float, default=None, help="Sliding-window overlap (default: train.sw_overlap).")
    parser.add_argument("--adapt-norm", action="store_true",
                        help="First adapt the normalization layers to these unlabeled scans (a site that never trained).")


def load_model(args: argparse.Namespace, cfg, state_root: Path) -> tuple[nn.Module, Plan, object]:
    """The run's model with global weights plus this site's norm tensors, and the plan."""
    from safetensors.torch import load_file

    from common.cli import UserError
    from common.config import load_config
    from common.model import build_model
    from common.params import load_merged, model_signature, split_parameters

    from .site_state import SiteState

    run_cfg = load_config(args.run / RUN_CONFIG) if (args.run / RUN_CONFIG).is_file() else None
    if run_cfg is None:
        raise UserError(f"{args.run / RUN_CONFIG} not found: --run must be a run folder from the centre.")
    plan_path = args.run / PLAN_FILE if (args.run / PLAN_FILE).is_file() else state_root / PLAN_FILE
    plan = Plan.load(plan_path)
    weights = args.weights or args.run / CHECKPOINT
    if not weights.is_file():
        raise UserError(f"{weights} not found: pass --weights with a global checkpoint (.safetensors).")
    model = build_model(run_cfg.model)
    split = split_parameters(model, run_cfg.train.norm_mode)
    local = SiteState(state_root).load_local(model_signature(model, split)) if state_root else None
    if local is None and run_cfg.train.norm_mode != "shared" and not args.adapt_norm:
        log.warning("this site has no normalization tensors of its own for this model: predicting with the "
                    "global initialisation of the norm layers; consider --adapt-norm")
    load_merged(model, split, load_file(str(weights)), local)
    return model, plan, run_cfg


def run(args: argparse.Namespace) -> int:
    from common.cli import UserError, config_from_args
    from common.norm_adapt import adapt_norm

    cfg = config_from_args(args)
    torch.set_num_threads(cfg.site.torch_threads)
    state_root = Path(cfg.site.state_dir) if cfg.site.state_dir else None
    model, plan, run_cfg = load_model(args, cfg, state_root)
    try:
        cases = channel_groups(scans(args.input), run_cfg.model.in_channels)
    except DatasetError as err:
        raise UserError(str(err)) from err
    args.output.mkdir(parents=True, exist_ok=True)
    if args.adapt_norm:
        train = run_cfg.train
        if train.adapt_norm_steps < 1:
            raise UserError("--adapt-norm needs train.adapt_norm_steps >= 1 in the run's config.")
        images = [prepare_image(paths, plan)[0].numpy() for paths in cases.values()]
        data = dataclasses.replace(plan.data_config(run_cfg.data))
        if adapt_norm(model, images, data, train.adapt_norm_steps, train.batch_size, train.seed):
            print(f"re-estimated the BatchNorm statistics on {len(images)} scan(s)")
        else:
            print("the model has no BatchNorm layer: nothing to adapt, it is used as it arrives")
    overlap = run_cfg.train.sw_overlap if args.overlap is None else args.overlap
    for i, paths in enumerate(cases.values(), 1):
        out = args.output / output_name(paths[0])
        print(f"[{i}/{len(cases)}] {paths[0].name} -> {out}")
        predict_file(paths, out, model, plan, run_cfg.model.out_channels, overlap, run_cfg.train.sw_batch_size,
                     progress=True, bf16=run_cfg.train.bf16)
    return 0
