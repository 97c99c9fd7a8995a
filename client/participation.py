"""What a deployed site will do with its cases, by the same rules the ClientApp applies (``fedseg-client check``).

A site that passes the data check can still be refused in a run: too few
training cases for its cohort floor, or labels coded unlike the federation's.
A small site may also train but send no validation or test score. ``check``
says each of these beforehand, from the site's own site.yaml, so that "OK"
means the deployment will accept the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import FedsegConfig
from common.dataset import DatasetSpec, split_cases
from common.labels import LabelMismatch, describe_coding, remap_table
from common.plan import Plan, PlanError
from common.runs import PLAN_FILE


@dataclass(frozen=True)
class Participation:
    lines: list[str]
    """One line per part of a run: training, validation, testing, held-out scoring, labels."""
    trains: bool
    """Whether the deployment accepts this site for training."""


def participation(cfg: FedsegConfig, spec: DatasetSpec) -> Participation:
    """The verdict per part of a run, with the site's floor (``site.min_cohort``) and the default split."""
    floor = cfg.site.min_cohort
    ids = [c.case_id for c in spec.cases]
    train, val = split_cases(ids, cfg.data.val_fraction, cfg.data.split_seed)
    trains = len(train) >= floor
    lines = [
        f"training:   {len(train)} case(s) "
        + ("-> trains" if trains else f"-> REFUSED: fewer than site.min_cohort = {floor}"),
        f"validation: {len(val)} case(s) "
        + (
            "-> sends its validation Dice"
            if len(val) >= floor
            else f"-> trains but sends no validation score (fewer than site.min_cohort = {floor})"
        ),
        f"testing:    {len(spec.test_cases)} labelled test case(s) "
        + (
            "-> sends its test Dice"
            if len(spec.test_cases) >= floor
            else "-> sends no test score" + (f" (fewer than site.min_cohort = {floor})" if spec.test_cases else "")
        ),
        f"held out:   {len(ids) + len(spec.test_cases)} labelled case(s) "
        + (
            "-> scored if the centre holds this site out"
            if len(ids) + len(spec.test_cases) >= floor
            else f"-> not scored if held out (fewer than site.min_cohort = {floor})"
        ),
    ]
    labels, agrees = label_lines(spec, Path(cfg.site.state_dir) / PLAN_FILE if cfg.site.state_dir else None)
    return Participation(lines + labels, trains and agrees)


def label_lines(spec: DatasetSpec, plan_file: Path | None) -> tuple[list[str], bool]:
    """This site's label map, and how it compares with the federation's last plan kept at the site, if any."""
    own = ", ".join(f"{v}: {name}" for name, v in sorted(spec.labels.items(), key=lambda item: item[1]))
    lines = [f"labels:     {own}; channels: {', '.join(spec.channel_names.values())}"]
    if plan_file is None or not plan_file.is_file():
        return lines + [
            "            (no federation plan at this site yet: the centre compares labels at planning)"
        ], True
    try:
        plan = Plan.load(plan_file)
    except PlanError:
        return lines, True
    if not plan.label_codes:
        return lines, True
    try:
        table = remap_table(spec.labels, plan.label_codes)
    except LabelMismatch as err:
        return lines + [f"            -> REFUSED by the federation of the last plan: {err}"], False
    if table is None:
        return lines + ["            -> the same as the federation's (its last plan)"], True
    theirs = describe_coding(spec.labels, plan.label_codes)
    verdict = (
        "remapped by name at this site (the centre allows it)"
        if plan.remap_labels
        else "REFUSED unless the centre sets data.remap_labels: true"
    )
    return lines + [f"            the federation codes them {theirs}: {verdict}"], plan.remap_labels
