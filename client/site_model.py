"""The model a site keeps: one folder that segments without fedseg's run folder or state.

``fedseg-client export`` merges a global checkpoint of round r with this
site's own normalization tensors of round r of the same run
(client/site_state.py) and writes::

    model.safetensors   every tensor of the network (shared weights + this site's norm layers)
    config.yaml         the model, data and train sections of the run's config
    plan.json           the preprocessing plan (spacing, patch size, normalization)
    labels.json         label name -> value, from the site's dataset.json
    provenance.json     run and its id, checkpoint, round, the Dice this site measured for that model, site, time,
                        SHA-256 of the weights
    README.md           the same provenance, and a few lines of Python that load the model

Which round by default is one rule for every site command (``DEFAULT_RULE``).
With ``--personalize`` the folder holds the personalized copy that this site's
cross-site evaluation fine-tuned (norm layers and, by ``train.personalize``,
the output layer, on its training cases) and scored on its validation cases:
the very tensors that were scored, not a new fine-tuning, and the provenance
names its round, its Dice and the validation cases that chose it.

Because the folder leaves the site's state directory, every export is also
recorded in ``<state_dir>/exports.jsonl`` (``fedseg-client audit`` lists them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import nn

from common.cli import UserError, site_state_dir
from common.config import FedsegConfig, load_config
from common.files import read_jsonl
from common.metrics_log import Event, is_kind, read_events
from common.model import build_model, network_spec
from common.plan import Plan
from common.private import private_dir
from common.runs import (
    BEST,
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    CHECKPOINT_NAMES,
    CHECKPOINT_STATE,
    CONFIG_FILE,
    EXPORT_LOG,
    LABELS_FILE,
    LAST,
    METRICS_FILE,
    PLAN_FILE,
    PROVENANCE_FILE,
    README_FILE,
    WEIGHTS_FILE,
    CheckpointName,
    parse_checkpoint_name,
)

from .reasons import SignatureMismatch
from .site_state import RunState

log = logging.getLogger("fedseg.client")
EXPORTED_SECTIONS = ("model", "data", "train")
DEFAULT_RULE = (
    "the centre's best round (checkpoints/state.json), or its last round when the run has no best; "
    "--weights picks another"
)
"""The one rule for the round a site command uses by default: export, predict, report and the personalized copy."""


@dataclass(frozen=True)
class Checkpoint:
    """A global checkpoint of a run as a site command names it: ``best``, ``last`` or ``round-N``."""

    choice: str
    round: int | None
    """The round it holds; None when the run folder does not say (no checkpoints/state.json)."""
    path: Path


def _recorded_rounds(run: Path) -> dict[str, int]:
    state = run / CHECKPOINT_DIR / CHECKPOINT_STATE
    return json.loads(state.read_text()) if state.is_file() else {}


def run_checkpoint(run: Path, choice: str | None = None) -> Checkpoint:
    """``best`` | ``last`` | ``round-N`` -> the global checkpoint in the run folder; None: the default
    (DEFAULT_RULE)."""
    rounds = _recorded_rounds(run)
    if choice is None:
        best = run / CHECKPOINT_DIR / BEST_CHECKPOINT
        choice = BEST if best.is_file() and (rounds.get("best_round") or not rounds) else LAST
    name = parse_checkpoint_name(choice)
    if name is None:
        raise UserError(f"--weights {choice!r}: use {CHECKPOINT_NAMES}.")
    server_round = name.round if name.round is not None else int(rounds.get(f"{name.alias}_round", 0)) or None
    path = run / CHECKPOINT_DIR / name.file
    if not path.is_file():
        raise UserError(
            f"{path} not found: the run folder has no '{choice}' checkpoint; give this site the run "
            "with `fedseg-server site-package` at the centre, or pick another with --weights."
        )
    return Checkpoint(choice, server_round, path)


def round_dice(run: Path, server_round: int | None, site: str) -> dict[str, float]:
    """This site's Dice and the federation's at ``server_round``, from the run's metrics log if present."""
    path = run / METRICS_FILE
    if server_round is None or not path.is_file():
        return {}
    found = {}
    for event in read_events(path):
        if event.get("round") != server_round:
            continue
        if is_kind(event, Event.EVALUATE) and event.get("site") == site:
            found["site_dice"] = float(event["dice"])
        if is_kind(event, Event.ROUND) and event.get("dice_mean") is not None:
            found["federation_dice"] = float(event["dice_mean"])
    return found


def site_dice(run: Path, loaded: RunModel, state: RunState, site: str) -> dict[str, Any]:
    """The Dice this site measured for exactly the loaded model, and where that number comes from.

    The site's own record (cross-site evaluation of that round, and of the
    personalized copy) comes first; else its validation Dice in the run's
    metrics log, which the site measured with the same pairing of that round.
    """
    logged = round_dice(run, loaded.checkpoint.round, site)
    mine = state.score(loaded.checkpoint.round)
    if loaded.personal is not None:
        return {
            **logged,
            "site_dice": loaded.personal["dice_after"],
            "dice_source": "this site's cross-site evaluation of its personalized copy",
        }
    if mine.get("cross_eval_dice") is not None:
        return {
            **logged,
            "site_dice": mine["cross_eval_dice"],
            "dice_source": f"this site's cross-site evaluation of round {loaded.checkpoint.round}",
        }
    if "site_dice" in logged:
        return {**logged, "dice_source": f"this site's validation of round {loaded.checkpoint.round} (metrics log)"}
    return logged


def label_names(cfg: FedsegConfig, num_classes: int) -> dict[str, int]:
    """Label name -> value from the site's dataset.json; class numbers when it cannot be read."""
    from common.dataset import DatasetError, read_dataset

    try:
        return dict(read_dataset(cfg.site.data_dir).labels)
    except (DatasetError, OSError, ValueError):
        return {f"class-{i}": i for i in range(num_classes)}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _readme(provenance: dict[str, Any], model_cfg: FedsegConfig) -> str:
    network, arguments = network_spec(model_cfg.model)
    dice = provenance.get("site_dice")
    return f"""# fedseg model of site {provenance["site"]}

| | |
|---|---|
| run | {provenance["run"]} (id {provenance["run_id"] or "none"}) |
| checkpoint | {provenance["weights"]} (round {provenance["round"] or "unknown"}) |
| Dice at this site | {"unknown" if dice is None else f"{dice:.4f}"} ({provenance.get("dice_source", "not measured")}) |
| federation Dice | {provenance.get("federation_dice", "unknown")} |
| site norm tensors | from round {provenance["norm_round"] or "unknown"} of this site's training in this run |
| personalized | {_personal_line(provenance.get("personalized"))} |
| exported | {provenance["exported"]} |
| SHA-256 of {WEIGHTS_FILE} | {provenance["sha256"]} |

Segment scans with fedseg: `fedseg-client predict --model THIS_FOLDER --input scans/ --output out/`.

Or load the network with torch and MONAI alone:

```python
from monai.networks.nets import {network.__name__}
from safetensors.torch import load_model

net = {network.__name__}({", ".join(f"{k}={v!r}" for k, v in arguments.items())})
load_model(net, "{WEIGHTS_FILE}")
net.eval()
```

Inputs must be preprocessed as `{PLAN_FILE}` says: RAS orientation, crop to the nonzero box,
resampling to `target_spacing`, per-channel normalization; windows of `patch_size` voxels.
Label values are in `{LABELS_FILE}`.
"""


def _personal_line(personal: dict[str, Any] | None) -> str:
    if not personal:
        return "no (the federated model with this site's norm tensors)"
    return (
        f"yes: the copy cross-site evaluation fine-tuned ({personal['steps']} steps on this site's training "
        f"cases) and scored, validation Dice {personal['dice_before']:.4f} -> {personal['dice_after']:.4f} "
        f"on validation cases {', '.join(personal['validation_cases'])}"
    )


def export_site_model(
    cfg: FedsegConfig, run: Path, choice: str | None, out: Path, personalize: bool = False
) -> dict[str, Any]:
    """Write the site's model folder (see the module docstring); returns its provenance."""
    from safetensors.torch import save_model

    state_dir = site_state_dir(cfg)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new folder for the exported model.")
    loaded = load_run_model(run, choice, state_dir, missing_local="error", personalized=personalize)
    state = loaded.state
    assert state is not None and state.site is not None, "a state folder was given, so the run's state is the site's"
    private_dir(out)  # the site's model, fitted to its patients: owner-only (0700), whatever the umask
    save_model(loaded.model, str(out / WEIGHTS_FILE))
    loaded.plan.save(out / PLAN_FILE)
    sections = {k: v for k, v in loaded.cfg.to_dict().items() if k in EXPORTED_SECTIONS}
    (out / CONFIG_FILE).write_text(yaml.safe_dump(sections, sort_keys=False))
    labels = label_names(cfg, loaded.cfg.model.out_channels)
    (out / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    provenance = {
        "run": loaded.cfg.federation.run_name or run.name,
        "run_id": loaded.cfg.federation.run_id,
        "weights": loaded.checkpoint.choice,
        "round": loaded.checkpoint.round,
        **site_dice(run, loaded, state, cfg.site.name),
        "site": cfg.site.name,
        "norm_round": loaded.norm_round,
        "personalized": loaded.personal,
        "exported": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "sha256": _sha256(out / WEIGHTS_FILE),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    (out / README_FILE).write_text(_readme(provenance, loaded.cfg))
    record_export(state.site.root, {**provenance, "folder": str(out.resolve()), "time": time.time()})
    return provenance


@dataclass
class RunModel:
    """A run's model as this site uses it: round r's shared weights with this site's tensors of round r."""

    model: nn.Module
    plan: Plan
    cfg: FedsegConfig
    """The run's config (config.yaml of the run folder)."""
    own: bool
    """Whether the site had tensors of its own for it (False: it never trained in this run by that round)."""
    checkpoint: Checkpoint
    norm_round: int | None
    """The round of this site's tensors in the model (None: none of its own)."""
    state: RunState | None
    """This site's state of the run (None without a site state folder)."""
    personal: dict[str, Any] | None = None
    """The personalized copy's facts (round, steps, Dice, validation cases), when that copy is loaded."""

    def describe(self) -> str:
        """One line naming the run, the round and whose norm tensors: every site command prints it."""
        which = (
            "the personalized copy cross-site evaluation scored"
            if self.personal
            else f"this site's norm tensors of round {self.norm_round}"
            if self.norm_round is not None
            else "no norm tensors of this site"
            if self.cfg.train.norm_mode != "shared"
            else "shared norm layers"
        )
        return (
            f"run {self.cfg.federation.run_name or '?'} ({self.cfg.federation.run_id or 'no id'}), "
            f"{self.checkpoint.choice} = round {self.checkpoint.round or 'unknown'}, with {which}"
        )


def load_run_model(
    run: Path,
    choice: str | None,
    state_root: Path | None,
    missing_local: Literal["warn", "quiet", "error"] = "warn",
    personalized: bool = False,
) -> RunModel:
    """The run's model: round r's global weights plus this site's tensors of round r (client/site_state.py).

    ``choice`` is best, last or round-N; None follows DEFAULT_RULE, or with
    ``personalized`` the round of the personalized copy. ``missing_local`` says
    what to do when the site has no tensors of its own for that round of this
    run (it never trained in it): warn, stay quiet, or refuse.
    """
    from safetensors.torch import load_file

    from common.params import load_merged, model_signature, split_parameters

    from .site_state import SiteState

    if not (run / CONFIG_FILE).is_file():
        raise UserError(
            f"{run / CONFIG_FILE} not found: --run must be a run folder from the centre "
            "(`fedseg-server site-package` writes one for a site)."
        )
    run_cfg = load_config(run / CONFIG_FILE)
    plan_path = run / PLAN_FILE if (run / PLAN_FILE).is_file() or state_root is None else state_root / PLAN_FILE
    plan = Plan.load(plan_path)
    model = build_model(run_cfg.model)
    split = split_parameters(model, run_cfg.train.norm_mode)
    signature = model_signature(model, split)
    state = (
        SiteState(state_root).run_named(run_cfg.federation.run_name or run.name, run_cfg.federation.run_id)
        if state_root
        else None
    )
    try:
        if personalized:
            return _personalized_model(run, choice, state, run_cfg, model, plan, signature)
        checkpoint = run_checkpoint(run, choice)
        if checkpoint.round is None and state is not None and state.trained and run_cfg.train.norm_mode != "shared":
            raise UserError(
                f"{run / CHECKPOINT_DIR / CHECKPOINT_STATE} not found: which round '{checkpoint.choice}' "
                "holds is unknown, so this site's tensors of that round cannot be chosen; pass "
                "--weights round-N."
            )
        own = state.norm_for(checkpoint.round, signature) if state is not None else None
    except SignatureMismatch as err:
        raise UserError(str(err)) from err
    if own is None and run_cfg.train.norm_mode != "shared":
        where = f"in {state.folder}" if state is not None else "(no site.state_dir)"
        if missing_local == "error":
            raise UserError(
                f"this site has no normalization tensors of its own for round {checkpoint.round} of run "
                f"{run_cfg.federation.run_name or run} {where}: it never trained in this run by that "
                "round; export needs a site that trained."
            )
        if missing_local == "warn":
            log.warning(
                "this site has no normalization tensors of its own for this run: predicting with the "
                "global initialisation of the norm layers; consider --adapt-norm"
            )
    load_merged(model, split, load_file(str(checkpoint.path)), None if own is None else own[1])
    return RunModel(
        model,
        plan,
        run_cfg,
        own is not None or run_cfg.train.norm_mode == "shared",
        checkpoint,
        None if own is None else own[0],
        state,
    )


def _personalized_model(
    run: Path,
    choice: str | None,
    state: RunState | None,
    run_cfg: FedsegConfig,
    model: nn.Module,
    plan: Plan,
    signature: str,
) -> RunModel:
    """The personalized copy this site's cross-site evaluation fine-tuned and scored, exactly as scored."""
    copy = state.personalized(signature) if state is not None else None
    if copy is None:
        raise UserError(
            f"this site keeps no personalized copy of run {run_cfg.federation.run_name or run}"
            f"{f' (looked in {state.folder})' if state else ''}: cross-site evaluation saves one when "
            "train.personalize_steps > 0 and the site trained in the run; use the federated model "
            "(without --personalize/--personalized)."
        )
    tensors, facts = copy
    checkpoint = run_checkpoint(run, choice or str(CheckpointName.of_round(facts["round"])))
    if checkpoint.round != facts["round"]:
        raise UserError(
            f"the personalized copy of this run at this site was fine-tuned from round {facts['round']}, "
            f"not from '{checkpoint.choice}' (round {checkpoint.round}); leave --weights out or pass "
            f"--weights {CheckpointName.of_round(facts['round'])}."
        )
    model.load_state_dict(tensors, strict=True)
    return RunModel(model, plan, run_cfg, True, checkpoint, facts["round"], state, facts)


def load_site_model(folder: Path) -> tuple[nn.Module, Plan, FedsegConfig]:
    """An exported model folder -> (network with all its weights, plan, config)."""
    from safetensors.torch import load_model

    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise UserError(
            f"{folder} is not an exported model folder (it needs {WEIGHTS_FILE} and {CONFIG_FILE}; "
            "write one with `fedseg-client export`)."
        )
    model_cfg = load_config(folder / CONFIG_FILE)
    model = build_model(model_cfg.model)
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    return model, Plan.load(folder / PLAN_FILE), model_cfg


def record_export(state_root: Path, entry: dict[str, Any]) -> None:
    """Append one line per export to the site's export log (what left the state folder, and where to)."""
    with (state_root / EXPORT_LOG).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def exports(state_root: Path) -> list[dict[str, Any]]:
    """Every export recorded at this site, oldest first."""
    return list(read_jsonl(state_root / EXPORT_LOG))
