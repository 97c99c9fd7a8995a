"""train.device and train.precision on a machine without a GPU (the CI machines): CPU, same results, clear errors."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_config
from common.device import (
    CPU,
    compute_for,
    cpu_bf16_available,
    resolve_device,
    with_site_compute,
)
from common.evaluation import evaluate
from common.model import build_model
from common.prefetch import Prefetcher
from common.training import train_local
from tests.helpers.tiny import tiny


def test_auto_is_the_cpu_here_and_fp32_is_the_default():
    assert not torch.cuda.is_available(), "this test documents the CPU-only machine"
    compute = compute_for(load_config().train)
    assert compute.device == CPU and compute.precision == "fp32"
    assert resolve_device("auto") == CPU


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_names_the_option_and_the_fix(name):
    with pytest.raises(ConfigError) as err:
        compute_for(load_config(None, [f"train.device={name}"]).train)
    assert f"train.device is '{name}'" in str(err.value) and "auto or cpu" in str(err.value)


def test_a_misspelt_device_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match="train.device: 'gpu'"):
        load_config(None, ["train.device=gpu"])


def test_fp16_needs_cuda():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        compute_for(load_config(None, ["train.device=cpu", "train.precision=fp16"]).train)


def test_cpu_bf16_runs_where_native_and_falls_back_to_fp32_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="common.device"):
        compute = compute_for(load_config(None, ["train.precision=bf16"]).train)
    if cpu_bf16_available():
        assert compute.precision == "bf16" and not caplog.records
    else:
        assert compute.precision == "fp32" and "no native bfloat16" in caplog.text


def test_a_site_yaml_picks_its_own_device_and_precision():
    federation = load_config(None, ["train.precision=bf16", "train.lr=0.01"]).train
    site = load_config(None, ["train.device=cpu"]).train
    merged = with_site_compute(federation, site)
    assert (merged.device, merged.precision, merged.lr) == ("cpu", "bf16", 0.01)


def _volumes():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 24, 24, 24)).astype(np.float32)
    label = np.zeros((1, 24, 24, 24), np.uint8)
    label[0, 8:16, 8:16, 8:16] = 1
    image[label > 0] += 2
    return [(image, label)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_and_evaluation_on_cpu_are_the_same_for_every_device_spelling(precision):
    """auto and cpu are the same device here: identical weights and metrics, model left on the CPU."""
    results = []
    for device in ("auto", "cpu"):
        cfg = load_config(None, tiny(f"train.device={device}", f"train.precision={precision}"))
        torch.manual_seed(0)
        model = build_model(cfg.model)
        anchors = {k: v.detach().clone() for k, v in model.named_parameters()}
        trained = train_local(model, _volumes(), cfg.data, cfg.train, anchors, mu=0.01, seed=0)
        scored = evaluate(model, _volumes(), cfg.data, cfg.train, 2)
        assert all(p.device == CPU for p in model.parameters())
        assert np.isfinite(trained.loss)
        results.append((trained.loss, scored.dice, [p.detach().clone() for p in model.parameters()]))
    (loss_a, dice_a, weights_a), (loss_b, dice_b, weights_b) = results
    assert loss_a == loss_b and dice_a == dice_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))


def test_prefetcher_yields_the_source_in_order_and_passes_its_errors_on():
    assert list(Prefetcher(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("augmentation failed")

    stream = Prefetcher(broken(), depth=2)
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="augmentation failed"):
        next(stream)


def test_prefetcher_stops_an_endless_source_when_closed():
    with Prefetcher(itertools.count(), depth=3) as stream:
        assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert not stream._thread.is_alive()
