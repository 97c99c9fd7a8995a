"""Before the first round: ask every site for its fingerprint and make the federation's plan.

The ServerApp waits for every site of ``federation.sites`` to connect (at
least ``federation.min_sites``, at most ``round_timeout_s``) and sends each
one ``query.fingerprint`` message; each replies with a MetricRecord of
aggregate statistics (common.fingerprint). The replies are merged and the
plan is made by nnU-Net's rules (common.plan), written to
``runs/<run>/plan.json`` with its provenance, and returned so that it travels
to the sites in every train and evaluate ConfigRecord. A resumed run reuses
the plan it started with, so its checkpoints and the sites' caches stay valid.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.config import FedsegConfig
from common.fingerprint import (
    FingerprintError,
    check_site_fingerprint,
    merge_fingerprints,
)
from common.labels import agreed_coding, coding_problem
from common.metrics_log import Event, MetricsLog
from common.plan import Plan, make_plan
from common.runs import PLAN_FILE
from common.wire import named_site

from .nodes import wait_for_nodes
from .site_registry import claim_problem, site_name

log = logging.getLogger("fedseg.server")
PLANNER = "fedseg federated nnU-Net rules (server/planning.py)"
QUERY_TYPE = f"{MessageType.QUERY}.{keys.FINGERPRINT_ACTION}"


class PlanningFailed(RuntimeError):
    """Too few sites sent a usable fingerprint to plan the federation."""


def _failure(metrics_log: MetricsLog | None, site: str, reason: str) -> None:
    log.warning("fingerprint of site %s unusable: %s", site, reason)
    if metrics_log is not None:
        metrics_log.write(Event.FAILURE, round=0, site=site, stage="fingerprint", reason=reason)


def _reply_problem(reply: Message, cfg: FedsegConfig, nodes: dict[int, str], node: int) -> str | None:
    """Why a fingerprint reply cannot be planned from, or None: checked alone, so one bad site is left out."""
    site = site_name(nodes, node, None)
    if reply.has_error():
        return reply.error.reason or f"error code {reply.error.code}"
    if problem := claim_problem(nodes, node, named_site(reply)):
        return problem
    if keys.FINGERPRINT not in reply.content.metric_records:
        return "no fingerprint in the reply"
    try:
        fp = check_site_fingerprint(dict(reply.content.metric_records[keys.FINGERPRINT]), site)
    except Exception as err:  # any malformed record leaves the site out, never ends the run
        return str(err) if isinstance(err, FingerprintError) else f"malformed fingerprint ({type(err).__name__})"
    for key, found in (("in_channels", len(fp.ct)), ("out_channels", len(fp.class_fraction))):
        if getattr(cfg.model, key) not in (0, found):
            return (
                f"the site declares {found} {'channel' if key == 'in_channels' else 'class'}(es); the centre's "
                f"model.{key} is {getattr(cfg.model, key)} (remove it to follow the sites' dataset.json)"
            )
    return None


def collect_fingerprints(
    grid: Grid, cfg: FedsegConfig, metrics_log: MetricsLog | None, nodes: dict[int, str] | None = None
) -> dict[str, dict]:
    """Site name -> fingerprint record, from every site that answered soundly.

    A site is named by its registered node (``nodes``), never by the name its
    reply claims. Each record is checked on its own (types, ranges, channels
    and classes against the model); a site whose CT flags differ from the
    majority's is left out too, so a malformed or odd site is logged and
    planned without instead of ending the run.
    """
    nodes = {} if nodes is None else nodes
    # Every listed site is waited for (up to a round's timeout): planning on the first
    # min_sites to connect would leave out, or fail on, sites that join a moment later.
    expected = max(cfg.federation.min_sites, len(cfg.federation.sites))
    node_ids = wait_for_nodes(grid, expected, cfg.federation.round_timeout_s)
    messages = [
        Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 0})}), node, QUERY_TYPE) for node in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s))
    # A reply is matched to the node it was sent to: an error the SuperLink makes for a node that went away
    # carries the SuperLink's own node id, not the site's.
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    records: dict[str, dict] = {}
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        from_site = reply.metadata.src_node_id == node  # not an answer the SuperLink made in its stead
        site = site_name(nodes, node, named_site(reply) if from_site else None)
        if problem := _reply_problem(reply, cfg, nodes, node):
            _failure(metrics_log, site, problem)
            continue
        records[site] = dict(reply.content.metric_records[keys.FINGERPRINT])
    return _agreed_labels(_majority_channels(records, metrics_log), cfg, metrics_log)


def _agreed_labels(records: dict[str, dict], cfg: FedsegConfig, metrics_log: MetricsLog | None) -> dict[str, dict]:
    """The records of the sites whose labels mean what the federation's mean (common/labels.py).

    The federation's coding is the most common one; a site that names its
    labels otherwise is left out by name, with what differs, and so is one that
    codes the same names with other values unless ``data.remap_labels``
    lets it remap them. Channel names that differ are only noted: sites name
    the same MRI sequence in many ways, and the CT flags already agree.
    """
    codings = {site: _label_codes(rec, site) for site, rec in records.items()}
    if not codings:
        return records
    agreed = agreed_coding(codings)
    for site, coding in codings.items():
        if problem := coding_problem(site, coding, agreed, cfg.data.remap_labels):
            _failure(metrics_log, site, problem)
    channel_names = {site: check_site_fingerprint(rec, site).channel_codes for site, rec in records.items()}
    if len(set(channel_names.values())) > 1:
        log.warning(
            "the sites name their image channels differently (%s); planning goes on by channel order",
            ", ".join(sorted(channel_names)),
        )
    return {
        site: rec
        for site, rec in records.items()
        if coding_problem(site, codings[site], agreed, cfg.data.remap_labels) is None
    }


def _label_codes(record: dict, site: str) -> tuple[int, ...]:
    return check_site_fingerprint(record, site).label_codes


def _majority_channels(records: dict[str, dict], metrics_log: MetricsLog | None) -> dict[str, dict]:
    """The records whose CT flags are the most common ones (ties: the flags of the first site by name)."""
    flags = {site: tuple(rec[f"{keys.FINGERPRINT_PREFIX}ct"]) for site, rec in sorted(records.items())}
    if not flags:
        return records
    common = Counter(flags.values()).most_common(1)[0][0]
    for site, ct in flags.items():
        if ct != common:
            _failure(
                metrics_log, site, f"the site's channel CT flags {list(ct)} differ from the other sites' {list(common)}"
            )
    return {site: rec for site, rec in records.items() if flags[site] == common}


def plan_federation(
    grid: Grid, cfg: FedsegConfig, run: Path, metrics_log: MetricsLog | None = None, nodes: dict[int, str] | None = None
) -> Plan:
    """The run's plan: reused from ``run/plan.json`` when resuming, else made from fingerprints."""
    path = Path(run) / PLAN_FILE
    if path.is_file():
        plan = Plan.load(path)
        log.info("reusing the run's plan %s from %s", plan.version, path)
        return plan
    records = collect_fingerprints(grid, cfg, metrics_log, nodes)
    if len(records) < cfg.federation.min_sites:
        raise PlanningFailed(
            f"only {len(records)} site(s) sent a usable fingerprint, the quorum is "
            f"{cfg.federation.min_sites}; see the failures in the metrics log."
        )
    agreed = agreed_coding({site: _label_codes(rec, site) for site, rec in records.items()})
    try:
        plan = make_plan(merge_fingerprints(dict(sorted(records.items()))), cfg.data, cfg.model, PLANNER)
    except FingerprintError as err:
        raise PlanningFailed(str(err)) from err
    plan = dataclasses.replace(plan, label_codes=agreed, remap_labels=cfg.data.remap_labels)
    plan.save(path)
    if metrics_log is not None:
        metrics_log.write(
            Event.PLAN,
            version=plan.version,
            target_spacing=list(plan.target_spacing),
            patch_size=list(plan.patch_size),
            sites=sorted(records),
            schemes=[n.scheme for n in plan.normalization],
        )
        metrics_log.sync()
    log.info(
        "plan %s: spacing %s, patch %s, normalization %s",
        plan.version,
        plan.target_spacing,
        plan.patch_size,
        [n.scheme for n in plan.normalization],
    )
    return plan


def plan_config(plan: Plan) -> ConfigRecord:
    """The ConfigRecord entry that carries the plan to the sites: its decisions only.

    The provenance (which sites, how many cases, their class fractions) stays
    in the centre's ``plan.json``: with two sites, each would learn the
    other's aggregates from it exactly.
    """
    return ConfigRecord({keys.PLAN: dataclasses.replace(plan, provenance={}).to_json()})
