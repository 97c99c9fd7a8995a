"""The site's cases, split once and preprocessed into its on-disk cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import FedsegConfig
from common.dataset import DatasetSpec, read_dataset, split_cases
from common.preprocess import PreprocessedCases

from .site_state import SiteState

Volume = tuple[np.ndarray, np.ndarray]


@dataclass
class SiteData:
    """Training and validation volumes of one site."""

    spec: DatasetSpec
    train_ids: list[str]
    val_ids: list[str]
    cases: PreprocessedCases

    @classmethod
    def open(cls, cfg: FedsegConfig, state: SiteState) -> SiteData:
        """Index the dataset and fix the split; the split is recorded in site.json
        the first time and reused afterwards, so validation cases never leak
        into training when cases are added later."""
        spec = read_dataset(cfg.site.data_dir)
        if spec.num_classes != cfg.model.out_channels:
            raise ValueError(
                f"dataset.json of site '{cfg.site.name}' declares {spec.num_classes} classes but "
                f"model.out_channels is {cfg.model.out_channels}; the federation must agree on the labels."
            )
        ids = [c.case_id for c in spec.cases]
        recorded = state.info().get("split")
        if recorded and set(recorded["train"]) | set(recorded["val"]) == set(ids):
            train_ids, val_ids = recorded["train"], recorded["val"]
        else:
            train_ids, val_ids = split_cases(ids, cfg.data.val_fraction, cfg.data.split_seed)
            state.update_info(split={"train": train_ids, "val": val_ids})
        return cls(spec, train_ids, val_ids, PreprocessedCases(state.cache_dir, cfg.data))

    def volumes(self, ids: list[str]) -> list[Volume]:
        by_id = {c.case_id: c for c in self.spec.cases}
        return [self.cases.load(by_id[i]) for i in ids]
