"""The shared/local split is decided by module type, for every norm layer and mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.config import ModelConfig
from common.model import build_model
from common.params import ParameterSplitError, load_merged, model_signature, select, split_parameters


class ThreeNorms(nn.Module):
    """One conv per norm kind, with names that no substring rule would recognise."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3)
        self.x = nn.BatchNorm3d(4)
        self.b = nn.Conv3d(4, 4, 3)
        self.y = nn.InstanceNorm3d(4, affine=True, track_running_stats=True)
        self.c = nn.Conv3d(4, 4, 3)
        self.z = nn.GroupNorm(2, 4)


def norm_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if k.split(".")[0] in {"x", "y", "z"}}


def test_local_mode_keeps_every_norm_tensor_home():
    model = ThreeNorms()
    split = split_parameters(model, "local")
    assert set(split.local) == norm_keys(model)
    assert set(split.travelling) == {k for k in model.state_dict() if k[0] in "abc"}
    assert all(not k.endswith("num_batches_tracked") for k in split.travelling)


def test_stats_mode_keeps_only_statistics_home():
    model = ThreeNorms()
    split = split_parameters(model, "stats")
    assert set(split.local) == {
        "x.running_mean",
        "x.running_var",
        "x.num_batches_tracked",
        "y.running_mean",
        "y.running_var",
        "y.num_batches_tracked",
    }
    assert {"x.weight", "y.bias", "z.weight", "z.bias"} <= set(split.travelling)


def test_shared_mode_sends_everything_but_counters():
    model = ThreeNorms()
    split = split_parameters(model, "shared")
    assert set(split.local) == {"x.num_batches_tracked", "y.num_batches_tracked"}
    assert "x.running_mean" in split.travelling


def test_fedprox_runs_over_shared_trainable_parameters_only():
    model = ThreeNorms()
    local = split_parameters(model, "local")
    assert set(local.trainable_shared) == {"a.weight", "a.bias", "b.weight", "b.bias", "c.weight", "c.bias"}
    stats = split_parameters(model, "stats")
    assert "x.weight" in stats.trainable_shared and "x.running_mean" not in stats.trainable_shared


def test_monai_unet_instance_norm_has_local_weights():
    model = build_model(
        ModelConfig(channels=[8, 16, 32], strides=[2, 2], in_channels=1, out_channels=2, norm="instance")
    )
    split = split_parameters(model, "local")
    assert split.local, "instance norm must be affine so FedBN keeps something local"
    assert all(k.endswith((".weight", ".bias")) for k in split.local)


def test_stats_mode_with_instance_norm_is_refused():
    model = build_model(
        ModelConfig(channels=[8, 16, 32], strides=[2, 2], in_channels=1, out_channels=2, norm="instance")
    )
    with pytest.raises(ParameterSplitError, match="norm_mode 'stats'"):
        split_parameters(model, "stats")


def test_dynunet_shared_storage_travels_once():
    model = build_model(
        ModelConfig(arch="dynunet", channels=[8, 16, 32], strides=[2, 2], in_channels=1, out_channels=2)
    )
    state = model.state_dict()
    split = split_parameters(model, "local")
    assert split.aliases, "DynUNet registers some modules twice"
    counted = set(split.travelling) | set(split.local) | set(split.aliases)
    assert counted == set(state)
    pointers = [state[k].data_ptr() for k in split.travelling]
    assert len(pointers) == len(set(pointers))


def test_load_merged_restores_shared_and_local_exactly():
    cfg = ModelConfig(arch="dynunet", channels=[8, 16, 32], strides=[2, 2], in_channels=1, out_channels=2)
    source, target = build_model(cfg), build_model(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    split = split_parameters(source, "local")
    load_merged(target, split, select(source, split.travelling), select(source, split.local))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_merged_rejects_foreign_arrays():
    model = ThreeNorms()
    split = split_parameters(model, "local")
    arrays = select(model, split.travelling)
    arrays.pop("a.weight")
    with pytest.raises(KeyError, match="a.weight"):
        load_merged(model, split, arrays)


def test_signature_changes_with_the_architecture():
    small = build_model(ModelConfig(channels=[8, 16, 32], strides=[2, 2], in_channels=1, out_channels=2))
    wider = build_model(ModelConfig(channels=[8, 16, 64], strides=[2, 2], in_channels=1, out_channels=2))
    assert model_signature(small, split_parameters(small, "local")) != model_signature(
        wider, split_parameters(wider, "local")
    )
    assert model_signature(small, split_parameters(small, "local")) != model_signature(
        small, split_parameters(small, "shared")
    )
