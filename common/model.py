"""Model factory: the shared 3D segmentation network, built from the config."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import DynUNet, UNet
from torch import nn

from .config import ModelConfig

SPATIAL_DIMS = 3
DYNUNET_KERNEL = 3


def norm_spec(norm: str) -> tuple[str, dict]:
    """MONAI norm factory argument for the configured norm.

    MONAI's plain "instance" norm has no parameters, so FedBN would keep nothing
    local; instance norm is therefore always built with affine weights.
    """
    if norm == "instance":
        return ("instance", {"affine": True})
    return ("batch", {})


def network_spec(cfg: ModelConfig) -> tuple[type[nn.Module], dict[str, Any]]:
    """The MONAI class and its keyword arguments for ``cfg``: one source for fedseg and for exported models."""
    if cfg.in_channels < 1 or cfg.out_channels < 2:
        raise ValueError(
            f"model.in_channels {cfg.in_channels} / out_channels {cfg.out_channels}: 0 means 'from the "
            "sites' dataset.json', which planning resolves before any model is built."
        )
    if cfg.arch == "unet":
        return UNet, {
            "spatial_dims": SPATIAL_DIMS,
            "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "channels": tuple(cfg.channels),
            "strides": tuple(cfg.strides),
            "num_res_units": cfg.num_res_units,
            "norm": norm_spec(cfg.norm),
            "dropout": cfg.dropout,
        }
    levels = len(cfg.channels)
    return DynUNet, {
        "spatial_dims": SPATIAL_DIMS,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "kernel_size": [DYNUNET_KERNEL] * levels,
        "strides": [1, *cfg.strides[: levels - 1]],
        "upsample_kernel_size": list(cfg.strides[: levels - 1]),
        "filters": list(cfg.channels),
        "norm_name": norm_spec(cfg.norm),
        "dropout": cfg.dropout or None,
        "res_block": cfg.num_res_units > 0,
    }


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network described by ``cfg`` (weights from torch's default init)."""
    network, arguments = network_spec(cfg)
    return network(**arguments)
