"""The comparison's methods as data: a name, how it runs, its label and its overrides of fedseg's default.

Each federated method changes the configured default (``fedseg``, no
overrides) in one respect, so its row answers one question: which norm, which
server optimizer, how many rounds for the same patches, which schedule. Only
how a method runs is code: ``local`` and ``pooled`` are simulations.baselines,
``federated`` the real ServerApp and ClientApp on Flower's simulation engine.

Labels and overrides are format strings over the base configuration's numbers
(``values``: {mu}, {rounds}, ...), and a method with ``when`` exists only where
that condition of the base holds (``CONDITIONS``), e.g. halving the local steps
needs an even number of them. Methods measured and dropped with their options
(docs/results.md): FedAdam and FedYogi at the server, scanner augmentation, the
poly learning rate, personalization of every weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from common.config import FedsegConfig

from .sites import site_names


@dataclass(frozen=True)
class Method:
    """One row of the comparison: how it runs, what it is called in the table, what it changes."""

    name: str
    kind: Literal["local", "pooled", "federated"]
    label: str
    overrides: tuple[str, ...] = ()


NO_EXTRAS = ("federation.server_optimizer=none", "train.personalize_steps=0")
"""Plain averaging and no personalization: what a published method does beyond its own idea."""
FEDAVG = ("train.norm_mode=shared", "train.proximal_mu=0", *NO_EXTRAS)
"""FedAvg as published: every tensor shared, no proximal term, plain averaging, no personalization."""

METHODS: tuple[dict, ...] = (
    {"name": "local", "kind": "local", "label": "Local only (each site alone)"},
    {"name": "pooled", "kind": "pooled", "label": "Pooled (all data in one place)"},
    {
        "name": "pooled-other-norm",
        "kind": "pooled",
        "label": "Pooled, {other_norm} norm",
        "overrides": ("model.norm={other_norm}",),
    },
    {"name": "fedavg", "label": "FedAvg (everything shared)", "overrides": FEDAVG},
    {
        "name": "fedprox",
        "label": "FedProx mu={mu} (everything shared)",
        "overrides": ("train.norm_mode=shared", *NO_EXTRAS),
    },
    {
        "name": "fedbn",
        "label": "FedBN (BatchNorm statistics and weights local, mu=0)",
        "overrides": ("model.norm=batch", "train.norm_mode=local", "train.proximal_mu=0", *NO_EXTRAS),
    },
    {
        "name": "fedin",
        "label": "Instance norm, weights local (mu=0)",
        "overrides": ("model.norm=instance", "train.norm_mode=local", "train.proximal_mu=0", *NO_EXTRAS),
    },
    {
        "name": "silobn",
        "label": "SiloBN (BatchNorm statistics local, weights shared, mu=0)",
        "overrides": ("model.norm=batch", "train.norm_mode=stats", "train.proximal_mu=0", *NO_EXTRAS),
    },
    {"name": "fedseg", "label": "fedseg default"},
    {
        "name": "cyclic",
        "label": "Cyclic weight transfer, instance norm (weights local): one site a round in turn, "
        "{cyclic_rounds} rounds x {local_steps} steps (same patches)",
        "overrides": (
            "federation.schedule=cyclic",
            "federation.server_optimizer=none",
            "model.norm=instance",
            "federation.rounds={cyclic_rounds}",
        ),
    },
    {
        "name": "no-momentum",
        "when": "momentum",
        "label": "fedseg default without server momentum (plain averaging)",
        "overrides": ("federation.server_optimizer=none",),
    },
    {
        "name": "fedavgm",
        "when": "no momentum",
        "label": "fedseg default + server momentum {server_momentum} (FedAvgM)",
        "overrides": ("federation.server_optimizer=momentum",),
    },
    {
        "name": "more-rounds",
        "when": "even local steps",
        "label": "fedseg default, {double_rounds} rounds x {half_steps} steps (same patches)",
        "overrides": ("federation.rounds={double_rounds}", "train.local_steps={half_steps}"),
    },
    {
        "name": "fewer-rounds",
        "when": "even rounds",
        "label": "fedseg default, {half_rounds} rounds x {double_steps} steps (same patches)",
        "overrides": ("federation.rounds={half_rounds}", "train.local_steps={double_steps}"),
    },
    {
        "name": "fedavg-fewer-rounds",
        "when": "even rounds",
        "label": "FedAvg, {half_rounds} rounds x {double_steps} steps (same patches)",
        "overrides": (*FEDAVG, "federation.rounds={half_rounds}", "train.local_steps={double_steps}"),
    },
)
"""Every method the comparison knows, in the order of its table (the --mu-sweep and --pretrained
methods follow, made from the command line in simulations.compare_run.methods_for)."""

CONDITIONS: dict[str, Callable[[FedsegConfig], bool]] = {
    "momentum": lambda base: base.federation.server_optimizer == "momentum",
    "no momentum": lambda base: base.federation.server_optimizer != "momentum",
    "even local steps": lambda base: base.train.local_steps % 2 == 0,
    "even rounds": lambda base: base.federation.rounds % 2 == 0,
}
"""What a method's ``when`` may name."""


def values(base: FedsegConfig) -> dict[str, str]:
    """The numbers of ``base`` that labels and overrides name, as they are written."""
    t, f = base.train, base.federation
    return {
        "mu": f"{t.proximal_mu:g}",
        "other_norm": "instance" if base.model.norm == "batch" else "batch",
        "rounds": str(f.rounds),
        "half_rounds": str(f.rounds // 2),
        "double_rounds": str(2 * f.rounds),
        "local_steps": str(t.local_steps),
        "half_steps": str(t.local_steps // 2),
        "double_steps": str(2 * t.local_steps),
        "cyclic_rounds": str(len(site_names(base)[0]) * f.rounds),
        "server_momentum": f"{f.server_momentum:g}",
    }


def table(base: FedsegConfig) -> list[Method]:
    """``METHODS`` filled in from ``base``, without those whose ``when`` does not hold for it."""
    known = values(base)
    return [
        Method(
            m["name"],
            m.get("kind", "federated"),
            m["label"].format(**known),
            tuple(o.format(**known) for o in m.get("overrides", ())),
        )
        for m in METHODS
        if "when" not in m or CONDITIONS[m["when"]](base)
    ]
