"""The site's cases: checked, split once, planned, and preprocessed into its on-disk cache.

Which plan a site uses, in order: the one the server sent with this message
(kept as ``<state_dir>/plan.json`` for later prediction), else the last one it
received, else a plan the site makes from its own fingerprint by the same
rules (a site working alone, or a test harness without a server).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, MetricRecord

from common import keys
from common.config import FedsegConfig
from common.dataset import DatasetSpec, read_dataset
from common.evaluation import EvalResult
from common.files import atomic_write_text
from common.fingerprint import FINGERPRINT_FORMAT, merge_fingerprints, site_fingerprint
from common.labels import ChannelMismatch, LabelMismatch, describe_coding, remap_table
from common.plan import Plan, make_plan
from common.preprocess import PreprocessedCases, Volume
from common.runs import FINGERPRINT_FILE, PLAN_FILE

from .check import preflight
from .reasons import TooFewCases
from .site import Site, received_plan
from .site_state import SiteState

log = logging.getLogger("fedseg.client")
LOCAL_PLANNER = "fedseg site-local plan (no federated plan received)"


@dataclass
class SiteData:
    """Training and validation volumes of one site, in the plan's space."""

    cfg: FedsegConfig
    """The site's config with the plan's spacing and patch size: what every loop that follows uses."""
    spec: DatasetSpec
    train_ids: list[str]
    val_ids: list[str]
    cases: PreprocessedCases
    plan: Plan

    @classmethod
    def open(cls, cfg: FedsegConfig, state: SiteState, msg: Message | None = None) -> SiteData:
        """Index, check, split and plan the site's dataset.

        Each case's side of the split depends on its id and the split seed
        alone (common.dataset.split_cases), so validation cases never leak
        into training when cases are added later; the split is recorded in
        site.json, and a change to it is named. ``cfg`` itself is left as it is: the returned
        ``cfg`` is a copy with the plan's spacing and patch size, validated
        again like any config.
        """
        spec, train_ids, val_ids = open_split(cfg, state)
        plan = resolve_plan(cfg, state, spec, train_ids, msg)
        planned = cfg.replace(data=plan.data_config(cfg.data))
        cases = PreprocessedCases(state.cache_dir, plan, spec.num_classes, federation_coding(spec, plan))
        return cls(planned, spec, train_ids, val_ids, cases, plan)

    @property
    def test_ids(self) -> list[str]:
        """Labelled test cases: scored at the end only, never used to choose anything."""
        return [c.case_id for c in self.spec.test_cases]

    @property
    def labelled_ids(self) -> list[str]:
        """Every labelled case: what a site that never trained is scored on."""
        return [*self.train_ids, *self.val_ids, *self.test_ids]

    def volumes(self, ids: list[str]) -> list[Volume]:
        return [self.cases.load(self.spec.case(i)) for i in ids]


def federation_coding(spec: DatasetSpec, plan: Plan) -> np.ndarray | None:
    """How this site's label values become the federation's (None: they are the same); refuses other names.

    The federation agreed on its labels by name at planning (common/labels.py).
    A site whose names match but whose values differ is remapped only when the
    centre allows it in the plan; otherwise it is refused, with both maps in
    this site's own names in site.log.
    """
    if not plan.label_codes:
        return None
    table = remap_table(spec.labels, plan.label_codes)
    if table is not None and not plan.remap_labels:
        raise LabelMismatch(
            f"this site's dataset.json codes the federation's labels with other values: the "
            f"federation's map is {{{describe_coding(spec.labels, plan.label_codes)}}}, this "
            f"site's {spec.labels}; recode labelsTr, or ask the centre for data.remap_labels: true"
        )
    if table is not None:
        log.info(
            "labels remapped by name to the federation's values: %s", describe_coding(spec.labels, plan.label_codes)
        )
    return table


def require_cohort(cfg: FedsegConfig, ids: list[str], what: str) -> list[str]:
    """``ids``, if there are at least ``site.min_cohort`` of them; else refuse (TooFewCases).

    A value computed from fewer cases (a Dice over one validation case, the
    foreground statistics of one patient) describes those patients, not a
    cohort; the site sends nothing computed from them, and says why.
    """
    if len(ids) < cfg.site.min_cohort:
        raise TooFewCases(f"{len(ids)} {what} case(s), fewer than site.min_cohort = {cfg.site.min_cohort}")
    return ids


def open_split(cfg: FedsegConfig, state: SiteState) -> tuple[DatasetSpec, list[str], list[str]]:
    """Read and preflight-check the dataset (refusing a broken one), then fix the split."""
    spec = read_dataset(cfg.site.data_dir)
    if cfg.model.out_channels and spec.num_classes != cfg.model.out_channels:
        raise LabelMismatch(
            f"dataset.json of site '{cfg.site.name}' declares {spec.num_classes} classes ({spec.labels}) but "
            f"the federation's model has {cfg.model.out_channels}; the federation must agree on the labels."
        )
    if cfg.model.in_channels and spec.num_channels != cfg.model.in_channels:
        raise ChannelMismatch(
            f"dataset.json of site '{cfg.site.name}' declares {spec.num_channels} channels but "
            f"model.in_channels is {cfg.model.in_channels}; the federation must agree on the modalities."
        )
    stamp, report = preflight(spec.root, state.info())
    if report is not None:
        state.update_info(checked_stamp=stamp)
    train_ids, val_ids = state.split(
        [c.case_id for c in spec.cases],
        cfg.data.val_fraction,
        cfg.data.split_seed,
        run=state.run(cfg).name if cfg.federation.run_name else "",
    )
    return spec, train_ids, val_ids


def fingerprint(cfg: FedsegConfig, state: SiteState) -> dict:
    """This site's fingerprint over its training cases, cached until the data or split change."""
    spec, train_ids, val_ids = open_split(cfg, state)
    key = f"{FINGERPRINT_FORMAT}:{state.info().get('checked_stamp')}:{','.join(train_ids)}:{len(val_ids)}"
    path = state.root / FINGERPRINT_FILE
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["record"]
    record = site_fingerprint(
        spec, require_cohort(cfg, train_ids, "training"), seed=cfg.data.split_seed, val_cases=len(val_ids)
    )
    atomic_write_text(path, json.dumps({"key": key, "record": record}))
    return record


def resolve_plan(
    cfg: FedsegConfig, state: SiteState, spec: DatasetSpec, train_ids: list[str], msg: Message | None
) -> Plan:
    stored = state.root / PLAN_FILE
    if (plan := received_plan(msg)) is not None:
        if not stored.is_file() or Plan.load(stored).version != plan.version:
            plan.save(stored)
            state.update_info(plan_version=plan.version)
            if removed := state.prune_cache(plan.version):
                log.info("new plan %s: removed the caches of plans %s", plan.version, removed)
        return plan
    if stored.is_file():
        return Plan.load(stored)
    merged = merge_fingerprints({cfg.site.name: fingerprint(cfg, state)})
    plan = make_plan(merged, cfg.data, cfg.model, LOCAL_PLANNER)
    log.info("no federated plan received: planned from this site's own data (plan %s)", plan.version)
    return plan


def fingerprint_reply(site: Site, msg: Message) -> Message:
    """The reply to a fingerprint query: aggregates only, under keys.FINGERPRINT."""
    record = fingerprint(site.cfg, site.state)
    reply = site.reply(msg, {keys.NUM_EXAMPLES: int(record[f"{keys.FINGERPRINT_PREFIX}cases"])})
    reply.content[keys.FINGERPRINT] = MetricRecord(record)
    return reply


def annotator_metrics(result: EvalResult) -> dict[str, float]:
    """Dice against the fusion and against each annotator, when cases have several label files."""
    if not result.dice_per_annotator:
        return {}
    per = {f"dice_annotator_{i + 1}": d for i, d in enumerate(result.dice_per_annotator[: keys.MAX_ANNOTATORS])}
    return {"dice_fusion": result.dice, **per}
