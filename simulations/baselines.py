"""The two non-federated reference points of a comparison: each site alone, and all data pooled.

Both use common.training and common.evaluation exactly as the ClientApp does (same loss, patch sampler,
optimizer, evaluation), the same initial weights (``train.seed``) and the same
compute budget as the federation: a site alone takes rounds x local_steps
steps, the pooled model rounds x local_steps x sites steps, which is what the
federation spends in total. Both train with one optimizer throughout, as
centralised training would. They are scored like the federated runs: on each
site's validation cases, on its labelled test cases (reported only), and a
held-out site on all its labelled cases.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from client.site_data import SiteData, fingerprint
from client.site_state import SiteState
from common.config import FedsegConfig
from common.device import compute_for
from common.evaluation import EvalResult, evaluate
from common.fingerprint import merge_fingerprints
from common.model import build_model
from common.norm_adapt import adapt_norm
from common.plan import make_plan
from common.preprocess import Volume
from common.runs import PLAN_FILE
from common.training import train_local


@dataclass(frozen=True)
class SiteSplit:
    train: list[Volume]
    val: list[Volume]
    num_classes: int
    test: list[Volume] = dataclasses.field(default_factory=list)
    """Labelled test cases: scored at the end, never used to choose anything."""

    @property
    def labelled(self) -> list[Volume]:
        """Every labelled case: what a site that never trained is scored on."""
        return [*self.train, *self.val, *self.test]


def _site_cfg(cfg: FedsegConfig, name: str, data_dir: Path, work_dir: Path) -> FedsegConfig:
    """The site as the baselines read it: in one process, so nothing leaves it and no cohort limit applies."""
    return cfg.replace(
        site=cfg.site.replace(name=name, data_dir=str(data_dir), state_dir=str(work_dir / name), min_cohort=1)
    )


PLANNER = "fedseg compare baselines: federated nnU-Net rules over the training sites"


def load_sites(
    cfg: FedsegConfig, datasets: dict[str, Path], training: list[str], work_dir: Path
) -> tuple[FedsegConfig, dict[str, SiteSplit]]:
    """Every site's volumes, preprocessed with the plan the federation would make.

    The plan comes from the training sites' fingerprints by the same rules as
    server/planning.py, and every site (held-out ones too) is given it, so the
    baselines see exactly the arrays the federated runs see. Returns the
    config with the plan's spacing and patch size filled in.
    """
    cfgs = {name: _site_cfg(cfg, name, path, work_dir) for name, path in datasets.items()}
    records = {name: fingerprint(cfgs[name], SiteState(work_dir / name)) for name in sorted(training)}
    plan = make_plan(merge_fingerprints(records), cfg.data, cfg.model, PLANNER)
    sites = {}
    for name, site_cfg in cfgs.items():
        state = SiteState(work_dir / name)
        plan.save(state.root / PLAN_FILE)
        data = SiteData.open(site_cfg, state)
        sites[name] = SiteSplit(
            data.volumes(data.train_ids), data.volumes(data.val_ids), data.spec.num_classes, data.volumes(data.test_ids)
        )
    return cfg.replace(data=plan.data_config(cfg.data)), sites


def _fresh_model(cfg: FedsegConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model)


def _train(
    cfg: FedsegConfig, volumes: list[Volume], steps: int, per_round: int, curve_sites: dict[str, SiteSplit]
) -> tuple[torch.nn.Module, list[float]]:
    """The trained model and its learning curve: mean validation Dice over ``curve_sites`` per round's worth."""
    model = _fresh_model(cfg)
    train_cfg = cfg.train.replace(local_steps=steps)
    curve: list[float] = []

    def score_round(step: int) -> None:
        curve.append(statistics.fmean(_score(cfg, model, s) for s in curve_sites.values()))
        model.train()

    train_local(
        model,
        volumes,
        cfg.data,
        train_cfg,
        global_params={},
        mu=0.0,
        seed=cfg.train.seed,
        every=per_round,
        checkpoint=score_round,
    )
    return model, curve


def _evaluate(cfg: FedsegConfig, model: torch.nn.Module, site: SiteSplit, volumes: list[Volume]) -> EvalResult:
    return evaluate(model, volumes, cfg.data, cfg.train.replace(hd95=False), site.num_classes)


def _score(cfg: FedsegConfig, model: torch.nn.Module, site: SiteSplit) -> float:
    return _evaluate(cfg, model, site, site.val).dice


def test_scores(cfg: FedsegConfig, models: dict[str, torch.nn.Module], sites: dict[str, SiteSplit]) -> dict[str, dict]:
    """Test Dice per site and per class, for the sites that have test cases (scored, never chosen on).

    ``models`` gives the model each site is scored with; the keys are those
    of compare_run.federated_result.
    """
    result: dict[str, dict] = {"test_per_site": {}, "test_per_class": {}}
    for name, site in sites.items():
        if site.test:
            test = _evaluate(cfg, models[name], site, site.test)
            result["test_per_site"][name], result["test_per_class"][name] = test.dice, test.dice_per_class
    return result


def held_out_scores(cfg: FedsegConfig, model: torch.nn.Module, site: SiteSplit) -> dict[str, float]:
    """Dice of a finished model on all labelled cases of a site that never trained, as-is and norm adapted."""
    as_is = _evaluate(cfg, model, site, site.labelled).dice
    t = cfg.train
    if not adapt_norm(
        model,
        [image for image, _ in site.labelled],
        cfg.data,
        t.adapt_norm_steps,
        t.batch_size,
        t.seed,
        compute_for(t).device,
    ):
        return {"dice": as_is, "dice_adapted": as_is}
    return {"dice": as_is, "dice_adapted": _evaluate(cfg, model, site, site.labelled).dice}


def local_only(cfg: FedsegConfig, sites: dict[str, SiteSplit]) -> tuple[dict[str, float], list[float], dict[str, dict]]:
    """Each site trains alone for rounds x local_steps steps; Dice on its own validation cases.

    Also returns the learning curve (the sites' mean validation Dice after
    each round's worth of steps) and the test scores (``test_scores``).
    """
    steps, per_round = cfg.federation.rounds * cfg.train.local_steps, cfg.train.local_steps
    scores, curves, models = {}, [], {}
    for name, site in sites.items():
        models[name], curve = _train(cfg, site.train, steps, per_round, {name: site})
        scores[name] = _score(cfg, models[name], site)
        curves.append(curve)
    return scores, [statistics.fmean(values) for values in zip(*curves, strict=True)], test_scores(cfg, models, sites)


def pooled(
    cfg: FedsegConfig, sites: dict[str, SiteSplit], held_out: dict[str, SiteSplit]
) -> tuple[dict[str, float], dict[str, dict[str, float]], list[float], dict[str, dict]]:
    """One model on all sites' training cases for the federation's total steps.

    Returns the Dice per training site, per held-out site as-is and adapted,
    the learning curve (mean validation Dice over the sites after each
    round's worth of steps) and the test scores (``test_scores``).
    """
    per_round = cfg.train.local_steps * len(sites)
    volumes = [v for site in sites.values() for v in site.train]
    model, curve = _train(cfg, volumes, cfg.federation.rounds * per_round, per_round, sites)
    per_site = {name: _score(cfg, model, site) for name, site in sites.items()}
    tests = test_scores(cfg, dict.fromkeys(sites, model), sites)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    unseen = {}
    for name, site in held_out.items():
        model.load_state_dict(state)
        unseen[name] = held_out_scores(cfg, model, site)
    return per_site, unseen, curve, tests
