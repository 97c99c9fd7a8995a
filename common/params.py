"""Which tensors travel and which stay at the site, decided by module type.

A tensor belongs to a normalization layer if its owning module is a BatchNorm,
InstanceNorm, GroupNorm or LayerNorm; names are never inspected, because
MONAI names its norm layers ``N`` or ``norm1`` and substring rules silently
match nothing. ``norm_mode`` then decides what of those stays local:

- ``local`` (FedBN): every norm parameter and buffer stays at the site.
- ``stats`` (SiloBN): running statistics stay, affine weights travel.
- ``shared`` (FedAvg): everything travels.

``num_batches_tracked`` never travels. Tensors that share storage (DynUNet
registers some modules twice) travel once, under their first name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from .config import FedsegConfig, NormMode
from .model import build_model

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)
COUNTER_SUFFIX = "num_batches_tracked"


class ParameterSplitError(ValueError):
    """The norm mode asks to keep tensors local, but the model has none of that kind."""


@dataclass(frozen=True)
class ParameterSplit:
    """The partition of a model's state_dict keys."""

    travelling: tuple[str, ...]
    """Keys sent to and received from the server, in state_dict order."""
    local: tuple[str, ...]
    """Keys kept in the site's state directory (includes counters)."""
    aliases: dict[str, str]
    """Duplicate key -> the travelling or local key whose storage it shares."""
    trainable_shared: tuple[str, ...]
    """Travelling keys that are trainable parameters: the FedProx term runs over these."""


def _norm_keys(model: nn.Module) -> tuple[set[str], set[str]]:
    """(parameter keys, buffer keys) owned directly by normalization modules."""
    params, buffers = set(), set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, NORM_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            params |= {prefix + n for n, _ in module.named_parameters(recurse=False)}
            buffers |= {prefix + n for n, _ in module.named_buffers(recurse=False)}
    return params, buffers


def kept_at_site(model: nn.Module, norm_mode: NormMode) -> set[str]:
    """The normalization keys ``norm_mode`` keeps at the site (``num_batches_tracked`` never travels anyway)."""
    norm_params, norm_buffers = _norm_keys(model)
    stays_local = {"local": norm_params | norm_buffers, "stats": norm_buffers, "shared": set()}[norm_mode]
    return {k for k in stays_local if not k.endswith(COUNTER_SUFFIX)}


def split_parameters(model: nn.Module, norm_mode: NormMode) -> ParameterSplit:
    """Partition ``model``'s state_dict into travelling and site-local keys."""
    state = model.state_dict(keep_vars=True)
    stays_local = kept_at_site(model, norm_mode)
    if norm_mode != "shared" and not stays_local:
        raise ParameterSplitError(
            f"norm_mode '{norm_mode}' keeps normalization tensors at the site, but this model has none "
            "of that kind (instance norm has no running statistics). Use norm_mode 'local', "
            "or model.norm 'batch'."
        )
    trainable = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    travelling, local, aliases = [], [], {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, tensor in state.items():
        ptr = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.numel() else None
        if ptr is not None and ptr in seen:
            aliases[key] = seen[ptr]
            continue
        if ptr is not None:
            seen[ptr] = key
        if key.endswith(COUNTER_SUFFIX) or key in stays_local:
            local.append(key)
        else:
            travelling.append(key)
    return ParameterSplit(
        travelling=tuple(travelling),
        local=tuple(local),
        aliases=aliases,
        trainable_shared=tuple(k for k in travelling if k in trainable),
    )


def model_signature(model: nn.Module, split: ParameterSplit) -> str:
    """Short hash of the travelling keys with their shapes and dtypes.

    Two parties agree on the wire format exactly when their signatures match.
    """
    state = model.state_dict()
    spec = [[k, list(state[k].shape), str(state[k].dtype)] for k in split.travelling]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def run_model(cfg: FedsegConfig) -> tuple[nn.Module, ParameterSplit, str]:
    """The run's network, seeded with ``train.seed``, its split by ``train.norm_mode`` and its signature.

    The centre and every site build it the same way, so the same seed gives
    the same initial weights and the signatures agree exactly when the
    configs do.
    """
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    split = split_parameters(model, cfg.train.norm_mode)
    return model, split, model_signature(model, split)


def select(model: nn.Module, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Detached copies of the named state_dict tensors."""
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in keys}


def load_merged(
    model: nn.Module,
    split: ParameterSplit,
    travelling: dict[str, torch.Tensor],
    local: dict[str, torch.Tensor] | None = None,
) -> None:
    """Load received shared tensors plus the site's own local tensors, strictly.

    Missing local tensors (a site's first round) keep the model's current
    values, i.e. the global initialisation. Every key must be accounted for.
    """
    missing = set(split.travelling) - set(travelling)
    extra = set(travelling) - set(split.travelling)
    if missing or extra:
        raise KeyError(
            f"received arrays do not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    merged = model.state_dict()
    for key, value in {**travelling, **(local or {})}.items():
        merged[key] = value.to(merged[key].dtype)
    for alias, canonical in split.aliases.items():
        merged[alias] = merged[canonical]
    model.load_state_dict(merged, strict=True)
