"""Several label files per case: sampled or fused for training, each scored in evaluation."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.config import load_config
from common.dataset import read_dataset
from common.evaluation import evaluate
from common.fingerprint import merge_fingerprints, site_fingerprint
from common.plan import make_plan
from common.preprocess import PreprocessedCases
from common.sampling import PatchSampler, fuse
from tests.helpers.nifti_cases import nnunet_dataset


class Threshold(nn.Module):
    """Foreground wherever the normalized image is bright: a stand-in for a trained network."""

    out_channels = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([4.0 - x, x - 4.0], dim=1)


def _volumes(tmp_path, n_annotators=3):
    spec = read_dataset(nnunet_dataset(tmp_path / "Dataset001_X", n_cases=2, annotators=n_annotators))
    cfg = load_config(
        None,
        [
            "model.strides=[2, 2]",
            "model.channels=[8, 16, 32]",
            "data.patch_size=[8, 8, 8]",
            "data.normalization=zscore",
            "train.hd95=false",
        ],
    )
    fp = merge_fingerprints({"a": site_fingerprint(spec, [c.case_id for c in spec.cases])})
    plan = make_plan(fp, cfg.data, cfg.model, "t")
    cases = PreprocessedCases(tmp_path / "cache", plan, 2)
    return spec, plan.data_config(cfg.data), cfg, [cases.load(c) for c in spec.cases]


def test_layout_lists_every_annotator(tmp_path):
    spec, _, _, volumes = _volumes(tmp_path)
    assert spec.annotators == ("labelsTr", "labelsTr_r2", "labelsTr_r3")
    assert volumes[0].label.shape[0] == 3
    assert not np.array_equal(volumes[0].label[0], volumes[0].label[1])


def test_training_samples_annotators_or_their_fusion(tmp_path):
    _, data, cfg, volumes = _volumes(tmp_path)
    data.foreground_fraction = 1.0
    labels = np.asarray(volumes[0].label)
    fused = fuse(labels, 2)
    assert fused.shape == (1, *labels.shape[1:])
    assert np.array_equal(fused[0], (labels.sum(0) >= 2).astype(np.uint8))  # majority of three
    sampler = PatchSampler(data, 1, seed=0, augment="none")
    sums = {int(sampler.patch(volumes[0])[1].sum()) for _ in range(40)}
    assert len(sums) > 1  # different annotators (or places) are drawn
    data.annotators = "fuse"
    fusing = PatchSampler(data, 1, seed=0, augment="none")
    image, label = fusing.patch(volumes[0])
    assert label.shape == (1, 8, 8, 8)


def test_evaluation_reports_dice_per_annotator_and_fusion(tmp_path):
    _, data, cfg, volumes = _volumes(tmp_path)
    result = evaluate(Threshold(), volumes, data, cfg.train, 2)
    assert result.dice_per_annotator is not None and len(result.dice_per_annotator) == 3
    reference, shifted, more_shifted = result.dice_per_annotator
    assert reference > 0.9 and reference > shifted > more_shifted
    single = evaluate(Threshold(), [(v.image, v.label[:1]) for v in volumes], data, cfg.train, 2)
    assert single.dice_per_annotator is None and abs(single.dice - reference) < 1e-6
