"""Sliding-window segmentation slab by slab, with memory bounded by one slab of logits.

Windows are visited slab by slab along the last axis, and logits are kept
only for the slab in progress (one window deep), so memory stays near the
size of the input; a window whose input is constant (air clipped by the CT
plan, zero padding) gives the same output wherever it lies and is computed
once. ``fedseg-client predict`` (client/predict.py) and ``fedseg-client
report`` (client/site_report.py) segment with it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.device import CPU_FP32, Compute

PROGRESS_WIDTH = 30

MIRROR_AXES = ((2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))
"""Test-time mirroring: every flip of a window's three spatial axes, as nnU-Net does."""


@dataclass(frozen=True)
class InferenceOptions:
    """How scans are segmented; every feature beyond the plain sliding window is off by default."""

    overlap: float = 0.25
    batch_size: int = 1
    """Windows per forward pass (train.sw_batch_size)."""
    compute: Compute = CPU_FP32
    mirror: bool = False
    """Test-time augmentation: average the logits of the 8 mirrored copies of every window (8x the time)."""
    probabilities: bool = False
    """Also write the softmax probabilities: one 4D file, a volume per class (1/255 resolution)."""
    largest_component: bool = False
    """Keep only the largest connected component of every foreground class."""
    output_format: str = "nifti"
    """``nifti``, or ``dicom-seg`` (a DICOM input only): see client/dicom_seg.py."""
    labels: tuple[tuple[str, int], ...] = ()
    """Label name and value, for the segments of a DICOM-SEG."""


@dataclass(frozen=True)
class Segmentation:
    label: np.ndarray
    """[X, Y, Z] uint8 class map."""
    probabilities: np.ndarray | None
    """[C, X, Y, Z] float16 softmax, when asked for."""


def _window_starts(size: int, roi: int, step: int) -> list[int]:
    """Window starts along one axis, covering it with the last window flush to its end."""
    if size <= roi:
        return [0]
    starts = list(range(0, size - roi, step))
    return [*starts, size - roi]


def _constant_key(window: torch.Tensor) -> tuple[float, ...] | None:
    """The per-channel value of a window that holds one value per channel, else None."""
    low, high = window.amin(dim=(1, 2, 3)), window.amax(dim=(1, 2, 3))
    return tuple(low.tolist()) if bool(torch.equal(low, high)) else None


class SlabInferer:
    """Sliding-window segmentation with memory bounded by one slab of logits, on the compute device.

    Kept over MONAI's ``sliding_window_inference(buffer_steps=1, buffer_dim=-1)``, which
    buffers one slab of windows too but still holds the whole volume's float32 logits
    and their argmax, and computes every air window. ``benchmarks/bench_predict.py``
    (synthetic CT, 64^3 windows, overlap 0.25, 4 windows per pass, 1 thread, a 2-core
    machine shared with other jobs, so CPU seconds rather than wall time):

    - 256x256x200: SlabInferer 6.6-7.8 s CPU, 0.66 GiB peak; MONAI buffered 5.9-8.6 s, 0.75 GiB;
    - 384x384x300: SlabInferer 15.3 s CPU, 0.89 GiB; MONAI buffered 23.3 s, 1.24 GiB.

    The gap grows with the volume (MONAI's logits are 8 bytes per voxel for 2 classes).
    """

    def __init__(
        self,
        model: nn.Module,
        roi: tuple[int, int, int],
        num_classes: int,
        options: InferenceOptions = InferenceOptions(),
        progress: bool = False,
    ) -> None:
        self.model = model
        self.roi = tuple(int(r) for r in roi)
        self.step = tuple(max(1, int(r * (1 - options.overlap))) for r in self.roi)
        self.num_classes = num_classes
        self.options = options
        self.compute = options.compute
        self.progress = progress
        self._constant: dict[tuple[float, ...], torch.Tensor] = {}

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 logits of a batch of windows, averaged over the mirrored copies with TTA."""
        with self.compute.autocast():
            logits = self.model(batch).float()
            if self.options.mirror:
                for axes in MIRROR_AXES:
                    logits += torch.flip(self.model(torch.flip(batch, axes)), axes).float()
                logits /= len(MIRROR_AXES) + 1
        return logits

    def _predict(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits per window; constant windows are computed once per value."""
        out: dict[int, torch.Tensor] = {}
        keys = [_constant_key(w) for w in windows]
        todo = []
        for i, key in enumerate(keys):
            if key is not None and key in self._constant:
                out[i] = self._constant[key]
            else:
                todo.append(i)
        for k in range(0, len(todo), self.options.batch_size):
            chunk = todo[k : k + self.options.batch_size]
            logits = self._forward(torch.stack([windows[i] for i in chunk]))
            for i, y in zip(chunk, logits, strict=True):
                out[i] = y
                if (key := keys[i]) is not None:
                    self._constant[key] = y
        return [out[i] for i in range(len(windows))]

    def __call__(self, image: torch.Tensor) -> np.ndarray:
        """image [C, X, Y, Z] -> label [X, Y, Z] uint8."""
        return self.segment(image).label

    @torch.no_grad()
    def segment(self, image: torch.Tensor) -> Segmentation:
        """image [C, X, Y, Z] (on any device) -> the label map, and the probabilities when asked for."""
        self.model.to(self.compute.device).eval()
        image = self.compute.to(image)
        shape = image.shape[1:]
        pad = [max(0, r - s) for r, s in zip(self.roi, shape, strict=True)]
        if any(pad):
            image = torch.nn.functional.pad(image, [0, pad[2], 0, pad[1], 0, pad[0]])
        size = image.shape[1:]
        rx, ry, rz = self.roi
        xs = _window_starts(size[0], rx, self.step[0])
        ys = _window_starts(size[1], ry, self.step[1])
        zs = _window_starts(size[2], rz, self.step[2])
        label = np.zeros(size, dtype=np.uint8, order="F")  # a slab along Z is contiguous; NIfTI's own order
        probabilities = np.zeros((self.num_classes, *size), np.float16) if self.options.probabilities else None
        # Summed logits of the slab in progress; the argmax of a sum equals that of MONAI's
        # average (the window count is positive), so the count is kept only for probabilities.
        logits = torch.zeros((self.num_classes, size[0], size[1], rz), device=self.compute.device)
        counts = (
            torch.zeros((1, size[0], size[1], rz), device=self.compute.device) if probabilities is not None else None
        )
        base = 0
        started = time.perf_counter()
        for n, z in enumerate(zs):
            if z - base + rz > logits.shape[-1]:
                raise RuntimeError("window order broke the slab buffer; report this as a bug")
            windows, places = [], []
            for x in xs:
                for y in ys:
                    windows.append(image[:, x : x + rx, y : y + ry, z : z + rz])
                    places.append((x, y))
            for (x, y), out in zip(places, self._predict(windows), strict=True):
                logits[:, x : x + rx, y : y + ry, z - base : z - base + rz] += out
                if counts is not None:
                    counts[:, x : x + rx, y : y + ry, z - base : z - base + rz] += 1
            done = zs[n + 1] if n + 1 < len(zs) else size[2]
            ready = done - base
            label[..., base:done] = logits[..., :ready].argmax(0).to(torch.uint8).cpu().numpy()
            if probabilities is not None and counts is not None:  # counts are kept exactly for probabilities
                soft = torch.softmax(logits[..., :ready] / counts[..., :ready], dim=0)
                probabilities[..., base:done] = soft.to(torch.float16).cpu().numpy()
            for buffer in (b for b in (logits, counts) if b is not None):
                buffer[..., : rz - ready] = buffer[..., ready:].clone()
                buffer[..., rz - ready :] = 0
            base = done
            if self.progress:
                _progress(n + 1, len(zs), time.perf_counter() - started)
        crop = (slice(None), slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        return Segmentation(label[crop[1:]], None if probabilities is None else probabilities[crop])


def _progress(done: int, total: int, elapsed: float) -> None:
    filled = round(PROGRESS_WIDTH * done / total)
    eta = elapsed / done * (total - done)
    sys.stderr.write(
        f"\r  [{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}] {done}/{total} slabs, "
        f"{elapsed:.0f} s, ~{eta:.0f} s left"
    )
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
