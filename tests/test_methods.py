"""The training options that compare's methods turn on: each does what its option says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai import transforms as mt

from common.config import load_config
from common.loops import POLY_EXPONENT, RunSteps, augmentation, lr_scheduler, make_optimizer
from common.model import build_model
from common.personalize import output_layer, personal_parameters, personalize
from common.preprocess import Volume
from tests.tiny import tiny

TINY = tiny("model.channels=[4, 8, 16]", "data.spacing=[1.0, 1.0, 1.0]")


def test_poly_schedule_decays_over_the_whole_run():
    cfg = load_config(None, ["train.lr_schedule=poly", "train.lr=0.01"]).train
    model = build_model(load_config(None, TINY).model)
    optimizer = make_optimizer(model, cfg)
    scheduler = lr_scheduler(optimizer, cfg, RunSteps(done=50, total=100))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** POLY_EXPONENT)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert lr_scheduler(optimizer, load_config(None, []).train, RunSteps(0, 10)) is None


def test_scanner_augmentation_adds_the_scanner_shift_transforms():
    standard, scanner = augmentation(0, "standard"), augmentation(0, "scanner")
    added = {type(t) for t in scanner.transforms} - {type(t) for t in standard.transforms}
    assert {mt.RandBiasFieldd, mt.RandHistogramShiftd, mt.RandGaussianSmoothd,
            mt.RandSimulateLowResolutiond} <= added
    assert augmentation(0, "none") is None
    flat = {"image": np.full((1, 16, 16, 16), 2.0, np.float32), "label": np.zeros((1, 16, 16, 16), np.float32)}
    varied = [np.asarray(scanner(dict(flat))["image"]).std() for _ in range(20)]
    assert max(varied) > 0.01, "a bias field or histogram shift must make a flat image uneven in some draws"


def _site(rng: np.random.Generator, shift: float) -> list[Volume]:
    volumes = []
    for _ in range(2):
        label = np.zeros((1, 24, 24, 24), np.uint8)
        label[0, 8:16, 8:16, 8:16] = 1
        image = (rng.normal(size=label.shape) * 0.3 + label * 2.0 + shift).astype(np.float32)
        volumes.append(Volume(image, label, None))
    return volumes


def test_personalization_trains_only_norm_and_head_and_never_loses_validation_dice():
    cfg = load_config(None, [*TINY, "model.norm=batch", "train.personalize_steps=10", "train.lr=0.01"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    chosen = {id(p) for p in personal_parameters(model, "norm+head")}
    assert {id(p) for p in output_layer(model).parameters()} <= chosen
    assert len(chosen) < len(list(model.parameters()))
    assert len(personal_parameters(model, "all")) == len(list(model.parameters()))  # plain fine-tuning
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    result = personalize(model, _site(rng, 3.0), _site(rng, 3.0), cfg.data, cfg.train, 2, seed=0)
    assert result.dice_after >= result.dice_before
    assert all(p.requires_grad for p in model.parameters()), "the flags are restored"
    named = dict(model.named_parameters())
    frozen = [k for k, p in named.items() if id(p) not in chosen]
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in frozen), "shared weights stay as they are"
    if result.steps:
        assert any(not torch.equal(before[k], model.state_dict()[k]) for k in named if id(named[k]) in chosen)
