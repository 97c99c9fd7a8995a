"""The model a site keeps: one folder that segments without fedseg's run folder or state.

``fedseg-client export`` merges a global checkpoint with this site's own
normalization tensors and writes::

    model.safetensors   every tensor of the network (shared weights + this site's norm layers)
    config.yaml         the model, data and train sections of the run's config
    plan.json           the preprocessing plan (spacing, patch size, normalization)
    labels.json         label name -> value, from the site's dataset.json
    provenance.json     run, checkpoint, round, Dice, site, time, SHA-256 of the weights
    README.md           the same provenance, and a few lines of Python that load the model

With ``--personalize`` the site first fine-tunes its norm layers (and, by
``train.personalize``, the output layer) of that model on its own training
cases, keeping the copy with the best Dice on its own validation cases
(common/personalize.py): the folder then holds this site's personal model,
and the provenance says how far personalization moved its validation Dice.
The federation's global model is not touched.

Because the folder leaves the site's state directory, every export is also
recorded in ``<state_dir>/exports.jsonl`` (``fedseg-client audit`` lists them).
"""

from __future__ import annotations

import hashlib
import logging
import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import nn

from common.cli import UserError
from common.config import FedsegConfig, load_config
from common.files import read_jsonl
from common.metrics_log import read_events
from common.model import build_model, network_spec
from common.plan import Plan
from common.private import private_dir
from common.runs import (BEST_CHECKPOINT, CHECKPOINT_DIR, CHECKPOINT_STATE, CONFIG_FILE, EXPORT_LOG, LABELS_FILE, METRICS_FILE,
                         PLAN_FILE, PROVENANCE_FILE, README_FILE, WEIGHTS_FILE)

log = logging.getLogger("fedseg.client")
EXPORTED_SECTIONS = ("model", "data", "train")
ROUND_CHOICE = re.compile(r"round-(\d+)")


def checkpoint_file(run: Path, choice: str) -> Path:
    """``best`` | ``last`` | ``round-N`` -> the global checkpoint in the run folder."""
    match = ROUND_CHOICE.fullmatch(choice)
    if choice in ("best", "last"):
        name = f"{choice}.safetensors"
    elif match:
        name = f"round-{int(match.group(1)):04d}.safetensors"
    else:
        raise UserError(f"--weights {choice!r}: use best, last or round-N (e.g. round-3).")
    path = run / CHECKPOINT_DIR / name
    if not path.is_file():
        raise UserError(f"{path} not found: the run folder has no '{choice}' checkpoint.")
    return path


def checkpoint_round(run: Path, choice: str) -> int | None:
    """The round a checkpoint holds, if the run folder says."""
    match = ROUND_CHOICE.fullmatch(choice)
    if match:
        return int(match.group(1))
    state = run / CHECKPOINT_DIR / CHECKPOINT_STATE
    if not state.is_file():
        return None
    return int(json.loads(state.read_text()).get(f"{choice}_round", 0)) or None


def round_dice(run: Path, server_round: int | None, site: str) -> dict[str, float]:
    """This site's Dice and the federation's at ``server_round``, from the run's metrics log if present."""
    path = run / METRICS_FILE
    if server_round is None or not path.is_file():
        return {}
    found = {}
    for event in read_events(path):
        if event.get("round") != server_round:
            continue
        if event["event"] == "evaluate" and event.get("site") == site:
            found["site_dice"] = float(event["dice"])
        if event["event"] == "round" and event.get("dice_mean") is not None:
            found["federation_dice"] = float(event["dice_mean"])
    return found


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
    return f"""# fedseg model of site {provenance['site']}

| | |
|---|---|
| run | {provenance['run']} |
| checkpoint | {provenance['weights']} (round {provenance['round'] or 'unknown'}) |
| Dice at this site | {'unknown' if dice is None else f'{dice:.4f}'} |
| federation Dice | {provenance.get('federation_dice', 'unknown')} |
| site norm tensors | from round {provenance['norm_round'] or 'unknown'} of this site's training |
| personalized | {_personal_line(provenance.get('personalized'))} |
| exported | {provenance['exported']} |
| SHA-256 of {WEIGHTS_FILE} | {provenance['sha256']} |

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
    return (f"yes: {personal['steps']} steps on this site's training cases, validation Dice "
            f"{personal['dice_before']:.4f} -> {personal['dice_after']:.4f}")


def personalized(cfg: FedsegConfig, run_cfg: FedsegConfig, model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Fine-tune ``model`` in place on this site's cases, in the run's plan (common/personalize.py); what it gained."""
    import dataclasses

    from common.device import with_site_compute
    from common.personalize import personalize
    from common.preprocess import PreprocessedCases

    from .site_data import open_split, require_cohort
    from .site_state import SiteState

    train = with_site_compute(run_cfg.train, cfg.train)
    if train.personalize_steps < 1:
        raise UserError("train.personalize_steps is 0 in the run's config: nothing to personalize; "
                        "export without --personalize.")
    site_cfg = dataclasses.replace(run_cfg, site=cfg.site, train=train)
    state = SiteState(Path(cfg.site.state_dir))
    spec, train_ids, val_ids = open_split(site_cfg, state)
    cases = PreprocessedCases(state.cache_dir, plan, spec.num_classes)
    train_cases, val_cases = ([cases.load(spec.case(i)) for i in require_cohort(site_cfg, ids, what)]
                              for ids, what in ((train_ids, "training"), (val_ids, "validation")))
    result = personalize(model, train_cases, val_cases, plan.data_config(site_cfg.data), train,
                         spec.num_classes, train.seed)
    return {"steps": result.steps, "dice_before": result.dice_before, "dice_after": result.dice_after,
            "scope": train.personalize}


def export_site_model(cfg: FedsegConfig, run: Path, choice: str, out: Path, personalize: bool = False
                      ) -> dict[str, Any]:
    """Write the site's model folder (see the module docstring); returns its provenance."""
    from safetensors.torch import save_model

    from .site_state import SiteState

    if not cfg.site.state_dir:
        raise UserError("site.state_dir is not set: pass the site's site.yaml with --config.")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new folder for the exported model.")
    state = SiteState(Path(cfg.site.state_dir))
    model, plan, run_cfg, _ = load_run_model(run, checkpoint_file(run, choice), state.root, missing_local="error")
    personal = personalized(cfg, run_cfg, model, plan) if personalize else None
    private_dir(out)  # the site's model, fitted to its patients: owner-only (0700), whatever the umask
    save_model(model, str(out / WEIGHTS_FILE))
    plan.save(out / PLAN_FILE)
    sections = {k: v for k, v in run_cfg.to_dict().items() if k in EXPORTED_SECTIONS}
    (out / CONFIG_FILE).write_text(yaml.safe_dump(sections, sort_keys=False))
    labels = label_names(cfg, run_cfg.model.out_channels)
    (out / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    server_round = checkpoint_round(run, choice)
    provenance = {
        "run": run_cfg.federation.run_name or run.name,
        "weights": choice,
        "round": server_round,
        **round_dice(run, server_round, cfg.site.name),
        "site": cfg.site.name,
        "norm_round": state.info().get("last_round"),
        "personalized": personal,
        "exported": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "sha256": _sha256(out / WEIGHTS_FILE),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    (out / README_FILE).write_text(_readme(provenance, run_cfg))
    record_export(state.root, {**provenance, "folder": str(out.resolve()), "time": time.time()})
    return provenance


def load_run_model(run: Path, weights: Path | None, state_root: Path | None,
                   missing_local: Literal["warn", "quiet", "error"] = "warn"
                   ) -> tuple[nn.Module, Plan, FedsegConfig, bool]:
    """The run's model with global weights plus this site's norm tensors, the plan, the run's config, and
    whether the site had norm tensors of its own (False: it never trained in this run).

    ``missing_local`` says what to do when the site has no norm tensors for this model.
    """
    from safetensors.torch import load_file

    from common.params import load_merged, model_signature, split_parameters

    from .site_state import SiteState

    if not (run / CONFIG_FILE).is_file():
        raise UserError(f"{run / CONFIG_FILE} not found: --run must be a run folder from the centre.")
    run_cfg = load_config(run / CONFIG_FILE)
    plan_path = run / PLAN_FILE if (run / PLAN_FILE).is_file() or state_root is None else state_root / PLAN_FILE
    plan = Plan.load(plan_path)
    weights = weights or run / CHECKPOINT_DIR / BEST_CHECKPOINT
    if not weights.is_file():
        raise UserError(f"{weights} not found: pass --weights with a global checkpoint (.safetensors).")
    model = build_model(run_cfg.model)
    split = split_parameters(model, run_cfg.train.norm_mode)
    local = SiteState(state_root).load_local(model_signature(model, split)) if state_root else None
    if local is None and run_cfg.train.norm_mode != "shared":
        if missing_local == "error":
            raise UserError(f"this site ({state_root}) has no normalization tensors of its own for the model of "
                            f"{run}: it never trained in this run; export needs a site that trained.")
        if missing_local == "warn":
            log.warning("this site has no normalization tensors of its own for this model: predicting with the "
                        "global initialisation of the norm layers; consider --adapt-norm")
    load_merged(model, split, load_file(str(weights)), local)
    return model, plan, run_cfg, local is not None or run_cfg.train.norm_mode == "shared"


def load_site_model(folder: Path) -> tuple[nn.Module, Plan, FedsegConfig]:
    """An exported model folder -> (network with all its weights, plan, config)."""
    from safetensors.torch import load_model

    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} is not an exported model folder (it needs {WEIGHTS_FILE} and {CONFIG_FILE}; "
                        "write one with `fedseg-client export`).")
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
