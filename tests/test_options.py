"""Options of ``model``, ``data`` and ``train`` that no other test sets away from their default, each run once
at the tiny size: DynUNet, dropout, no augmentation, personalization of the norm layers only, the sliding
window's batch and overlap, CT normalization forced, and the CT clipping percentiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.config import load_config
from common.evaluation import evaluate
from common.fingerprint import merge_fingerprints
from common.params import run_model
from common.personalize import output_layer, personal_parameters
from common.plan import make_plan
from common.preprocess import Volume
from common.training import train_local
from tests.helpers.tiny import tiny
from tests.test_plan import hand_made

SHAPE = (24, 24, 24)


def _cases(n: int = 2) -> list[Volume]:
    """Cubes brighter than their background: learnable, and small enough for one step on 2 cores."""
    rng, volumes = np.random.default_rng(0), []
    for _ in range(n):
        label = np.zeros((1, *SHAPE), np.uint8)
        label[0, 6:14, 8:16, 6:14] = 1
        image = (rng.normal(size=label.shape) * 0.3 + label * 2.0).astype(np.float32)
        volumes.append(Volume(image, label, None))
    return volumes


def _train_and_score(*overrides: str, steps: int = 1):
    cfg = load_config(None, tiny(f"train.local_steps={steps}", "data.spacing=[1.0, 1.0, 1.0]", *overrides))
    model, split, _ = run_model(cfg)
    result = train_local(model, _cases(), cfg.data, cfg.train, global_params={}, mu=0.0, seed=0)
    return cfg, model, split, result


def test_dynunet_trains_a_step_travels_and_predicts():
    """model.arch: dynunet, nnU-Net's network, through the same path as the UNet: split, train, predict."""
    cfg, model, split, result = _train_and_score("model.arch=dynunet")
    assert type(model).__name__ == "DynUNet"
    assert np.isfinite(result.loss) and result.steps == 1
    assert split.travelling and split.local, "norm tensors stay at the site, the rest travels"
    scored = evaluate(model, _cases(1), cfg.data, cfg.train, num_classes=2)
    assert 0.0 <= scored.dice <= 1.0 and np.isfinite(scored.loss)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_dropout_is_built_trains_and_is_off_when_scoring():
    cfg, model, _, result = _train_and_score("model.dropout=0.5")
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] and all(
        m.p == 0.5 for m in model.modules() if isinstance(m, nn.Dropout)
    )
    assert np.isfinite(result.loss)
    first, second = (evaluate(model, _cases(1), cfg.data, cfg.train, 2) for _ in range(2))
    assert first.dice == second.dice and first.loss == second.loss


def test_training_without_augmentation_is_repeatable():
    losses = [_train_and_score("train.augmentation=none", steps=2)[3].loss for _ in range(2)]
    assert losses[0] == losses[1]


def test_personalizing_the_norm_layers_leaves_the_output_layer_shared():
    cfg = load_config(None, tiny("model.norm=batch", "train.personalize=norm"))
    model, _, _ = run_model(cfg)
    chosen = {id(p) for p in personal_parameters(model, cfg.train.personalize)}
    head = {id(p) for p in output_layer(model).parameters()}
    assert chosen and not chosen & head
    assert chosen < {id(p) for p in personal_parameters(model, "norm+head")}


def test_the_sliding_windows_batch_does_not_change_the_score_and_overlap_runs():
    cfg, model, _, _ = _train_and_score()
    one = evaluate(model, _cases(1), cfg.data, load_config(None, tiny("train.sw_batch_size=1")).train, 2)
    four = evaluate(model, _cases(1), cfg.data, load_config(None, tiny("train.sw_batch_size=4")).train, 2)
    assert one.dice == pytest.approx(four.dice) and one.loss == pytest.approx(four.loss, rel=1e-5)
    overlapping = evaluate(model, _cases(1), cfg.data, load_config(None, tiny("train.sw_overlap=0.5")).train, 2)
    assert 0.0 <= overlapping.dice <= 1.0


def test_ct_clipping_follows_data_clip_percentiles():
    intensities = np.random.default_rng(0).normal(40, 20, 5000)
    fp = merge_fingerprints({"a": hand_made([[1.0] * 3] * 2, [[100.0] * 3] * 2, intensities)})
    cfg = load_config(None, tiny("data.patch_size=[]", "data.clip_percentiles=[5, 95]"))
    norm = make_plan(fp, cfg.data, cfg.model, "t").normalization[0]
    assert norm.scheme == "ct"
    assert (norm.clip_low, norm.clip_high) == (fp.intensity_percentile(0, 5), fp.intensity_percentile(0, 95))
    default = make_plan(fp, load_config(None, tiny("data.patch_size=[]")).data, cfg.model, "t").normalization[0]
    assert default.clip_low < norm.clip_low < norm.clip_high < default.clip_high


def test_data_normalization_ct_applies_to_a_channel_not_declared_ct():
    fp = merge_fingerprints({"a": hand_made([[1.0] * 3] * 2, [[100.0] * 3] * 2, ct=False)})
    planned = {
        scheme: make_plan(
            fp,
            load_config(None, tiny("data.patch_size=[]", f"data.normalization={scheme}")).data,
            load_config(None, tiny()).model,
            "t",
        ).normalization[0]
        for scheme in ("auto", "ct")
    }
    assert planned["auto"].scheme == "zscore" and planned["ct"].scheme == "ct"
