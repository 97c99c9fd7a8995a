"""Training options at work: augmentation, the local optimizer, personalization; each does what its option says."""

from __future__ import annotations

import numpy as np
import torch
from monai import transforms as mt

from common.augmentation import augmentation
from common.config import load_config
from common.model import build_model
from common.personalize import output_layer, personal_parameters, personalize
from common.preprocess import Volume
from common.training import make_optimizer
from tests.helpers.tiny import tiny

TINY = tiny("model.channels=[4, 8, 16]", "data.spacing=[1.0, 1.0, 1.0]")


def test_standard_augmentation_is_seeded_and_none_leaves_patches_as_sampled():
    standard = augmentation(0, "standard")
    assert {mt.RandAffined, mt.RandFlipd, mt.RandAdjustContrastd, mt.RandGaussianNoised} <= {
        type(t) for t in standard.transforms
    }
    assert augmentation(0, "none") is None
    patch = {
        "image": np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32),
        "label": np.zeros((1, 16, 16, 16), np.float32),
    }
    draws = [[np.asarray(augmentation(3, "standard")(dict(patch))["image"]) for _ in range(5)] for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*draws, strict=True)), "the same seed gives the same augmentations"
    assert any(not np.array_equal(d, patch["image"]) for d in draws[0])


def test_the_local_optimizer_is_adam_over_the_trainable_parameters_only():
    cfg = load_config(None, [*TINY, "train.lr=0.01", "train.weight_decay=0.001"])
    model = build_model(cfg.model)
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    optimizer = make_optimizer(model, cfg.train)
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.001
    assert all(p is not frozen for p in group["params"])
    assert len(group["params"]) == len(list(model.parameters())) - 1


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
