"""Where a model runs and in which precision: ``train.device`` and ``train.precision``.

Every place that runs a model (site training and evaluation, cross-site
evaluation, norm adaptation, the baselines, the benchmarks and ``predict``)
asks this module for a ``Compute``: the torch device, the autocast context and
the GradScaler. Models live on the CPU between calls (that is where their
tensors are split, saved and sent); ``on_device`` moves one to the compute
device for the duration of a call and back.

On a machine without a GPU, ``auto`` is the CPU and ``fp32`` runs exactly the
operations fedseg ran before devices existed, so results do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import SITE_TRAIN_KEYS, ConfigError, TrainConfig

log = logging.getLogger("fedseg.common")

Precision = Literal["fp32", "bf16", "fp16"]
CPU = torch.device("cpu")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_available() -> bool:
    """Native bfloat16 on this CPU; without it autocast is emulated and many times slower."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device that exists on this machine.

    Asking for CUDA where torch sees none is an error, not a silent fall back to a
    CPU that may be a hundred times slower.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return CPU
    if not torch.cuda.is_available():
        raise ConfigError(
            f"train.device is {name!r} but torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); set train.device: auto or cpu, or install a CUDA build "
            "of torch and the NVIDIA driver."
        )
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device is {name!r} but this machine has {torch.cuda.device_count()} CUDA "
            f"GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1}); pick one of those."
        )
    torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick the fastest kernels once
    return device


def effective_precision(precision: Precision, device: torch.device) -> Precision:
    """The precision that will run: bf16 needs native support, fp16 needs CUDA (with a GradScaler)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision: fp16 needs a CUDA GPU, but the model runs on {device}; use bf16 (CPUs with "
            "AVX512-BF16/AMX) or fp32 there."
        )
    if precision == "bf16":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_bf16_available()
        if not native:
            log.warning("train.precision is bf16 but %s has no native bfloat16; running fp32", device)
            return "fp32"
    return precision


@dataclass(frozen=True)
class Compute:
    """A resolved device and precision, with the autocast and scaler that go with them."""

    device: torch.device
    precision: Precision

    def autocast(self) -> AbstractContextManager:
        """Mixed-precision region for forward passes; a no-op at fp32."""
        dtype = AUTOCAST_DTYPES.get(self.precision, torch.bfloat16)
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32")

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (small gradients would underflow); disabled, a pass-through, otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def synchronize(self) -> None:
        """Wait for queued GPU work, so wall-clock timings mean something; nothing to wait for on a CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def to(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the compute device (asynchronous from pinned memory on CUDA)."""
        return tensor.to(self.device, non_blocking=self.device.type == "cuda")


def with_site_compute(federation: TrainConfig, site: TrainConfig) -> TrainConfig:
    """The federation's train settings, with the device and precision a site's own site.yaml sets.

    Hardware differs between hospitals, so a site may pick its GPU (``cuda:1``) or
    precision; what its site.yaml set counts (``model_fields_set``), even when
    it is the default: ``device: auto`` there wins over the centre's ``cuda``.
    """
    return federation.replace(**{k: getattr(site, k) for k in SITE_TRAIN_KEYS if k in site.model_fields_set})


CPU_FP32 = Compute(CPU, "fp32")
"""What fedseg ran before devices existed; the default where no config is at hand."""


def compute_for(cfg: TrainConfig) -> Compute:
    """The Compute described by ``train.device`` and ``train.precision``."""
    device = resolve_device(cfg.device)
    return Compute(device, effective_precision(cfg.precision, device))


@contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Run ``model`` on ``device`` inside the block; afterwards (also on errors) it is back where it was.

    Nested uses (an evaluation inside a training run's learning curve) leave the outer one's device alone.
    """
    first = next(model.parameters(), None)  # a model without weights has no device of its own
    before = first.device if first is not None else device
    model.to(device)
    try:
        yield model
    finally:
        model.to(before)
