"""Turn a case on disk into normalised arrays on the target grid, cached on disk.

The pipeline is one MONAI dictionary Compose: load with nibabel, channel first,
reorient to RAS, resample to the target spacing (image linear, label nearest),
clip each case's intensities to its own percentiles, then z-score per channel.
Results are cached as .npz per case under a folder named after the data config,
so a change of spacing or normalisation never reuses stale arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from monai import transforms as mt

from .config import DataConfig
from .dataset import Case

IMAGE, LABEL = "image", "label"


def preprocessing_id(cfg: DataConfig) -> str:
    """Names the cache folder after everything that changes the preprocessed arrays."""
    relevant = {k: v for k, v in asdict(cfg).items() if k in ("spacing", "clip_percentiles")}
    return "prep-" + hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


def preprocessing_pipeline(cfg: DataConfig) -> mt.Compose:
    low, high = cfg.clip_percentiles
    return mt.Compose(
        [
            mt.LoadImaged(keys=[IMAGE, LABEL], reader="NibabelReader", image_only=True),
            mt.EnsureChannelFirstd(keys=[IMAGE, LABEL]),
            mt.Orientationd(keys=[IMAGE, LABEL], axcodes="RAS"),
            mt.Spacingd(keys=[IMAGE, LABEL], pixdim=cfg.spacing, mode=("bilinear", "nearest")),
            mt.ClipIntensityPercentilesd(keys=IMAGE, lower=low, upper=high, channel_wise=True),
            mt.NormalizeIntensityd(keys=IMAGE, channel_wise=True),
        ]
    )


def _atomic_save(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class PreprocessedCases:
    """Preprocessed arrays of a site's cases, computed once and kept on disk."""

    def __init__(self, cache_root: Path, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.cache_dir = Path(cache_root) / preprocessing_id(cfg)
        self._pipeline: mt.Compose | None = None

    def _compute(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        if self._pipeline is None:
            self._pipeline = preprocessing_pipeline(self.cfg)
        images = [str(p) for p in case.images]
        out = self._pipeline({IMAGE: images if len(images) > 1 else images[0], LABEL: str(case.label)})
        image = np.asarray(out[IMAGE], dtype=np.float32)
        label = np.rint(np.asarray(out[LABEL])).astype(np.uint8)
        return image, label

    def load(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        """(image [C,X,Y,Z] float32, label [1,X,Y,Z] uint8), from cache when possible."""
        path = self.cache_dir / f"{case.case_id}.npz"
        if path.is_file():
            with np.load(path) as cached:
                return cached[IMAGE], cached[LABEL]
        image, label = self._compute(case)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(path, image=image, label=label)
        return image, label
