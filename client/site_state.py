"""A site's private state directory, which never leaves the site; a site's model belongs to its run.

Layout (docs/architecture.md, "Site state directory")::

    <state_dir>/site.json                         site facts: plan version, the recorded split
    <state_dir>/runs/<run_name>-<run_id>/run.json       this run at this site: signature, rounds, scores
    <state_dir>/runs/<run_name>-<run_id>/norm/round-NNNN.safetensors
    <state_dir>/runs/<run_name>-<run_id>/personalized.safetensors

The site's own normalization tensors are kept per run, keyed by the run's
identity (``federation.run_id``) and not by its display name alone, so a later
run, or one running at the same time, never changes an earlier run's model.
They are kept per round, as the centre keeps a global checkpoint per round:
global round r's shared weights are always used with the tensors this site
held after round r (the last round it trained at or before r), never with
whatever the site wrote last. Each file is written atomically
(common/files.py) and carries the model signature it belongs to, so tensors
of another model are refused with a message and never moved or overwritten.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from common.config import FedsegConfig
from common.dataset import split_cases
from common.files import atomic_write_bytes, atomic_write_text
from common.private import private_dir
from common.runs import (
    CACHE_DIR,
    CACHE_PLAN_DIR,
    LEGACY_RUN,
    NO_RUN_ID,
    NORM_FILE,
    NORM_ROUND_FILE,
    PERSONALIZED_FILE,
    SITE_FILE,
    SITE_NORM_DIR,
    SITE_RUN_FILE,
    SITE_RUNS_DIR,
    round_of_file,
)

from .reasons import SignatureMismatch

PLAN_CACHE = re.compile(CACHE_PLAN_DIR.format("[0-9a-f]{12}"))
"""Cache folders are named after the plan version (common/preprocess.py); nothing else there is removed."""
SIGNATURE_META, ROUND_META = "model_signature", "round"
"""Metadata every tensor file of a run carries: the model it fits and the round it comes from."""

log = logging.getLogger("fedseg.client")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, payload)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _checked_load(path: Path, signature: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of ``path`` if they belong to model ``signature``; else SignatureMismatch, the file untouched."""
    meta = _metadata(path)
    if meta.get(SIGNATURE_META) != signature:
        raise SignatureMismatch(
            f"{path} holds tensors of model signature {meta.get(SIGNATURE_META)}, not {signature}: this run's "
            "model at this site is another model than the one asked for; the file is left as it is. Check that "
            "--run names the run whose model this is (its config.yaml)."
        )
    return load_file(path), meta


class RunState:
    """What this site keeps of one run: ``<state_dir>/runs/<run_name>-<run_id>/``."""

    def __init__(self, folder: Path, site: SiteState | None = None) -> None:
        self.folder = folder
        self.name = folder.name
        self.site = site
        """The state folder it belongs to, whose site.json names the last round trained in any run (status)."""

    # --- facts ---------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        path = self.folder / SITE_RUN_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def record(self, **fields: Any) -> None:
        """Merge ``fields`` into run.json (one run is handled by one message at a time at a site)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.folder / SITE_RUN_FILE, json.dumps({**self.info(), **fields, "updated": time.time()}, indent=2)
        )

    # --- the site's own tensors, per round ---------------------------------------------------------------
    def norm_path(self, server_round: int) -> Path:
        return self.folder / SITE_NORM_DIR / NORM_ROUND_FILE.format(server_round)

    def rounds(self) -> list[int]:
        """The rounds whose tensors this site keeps, oldest first."""
        folder = self.folder / SITE_NORM_DIR
        if not folder.is_dir():
            return []
        return sorted(r for p in folder.iterdir() if (r := round_of_file(p.name, NORM_ROUND_FILE)) is not None)

    @property
    def trained(self) -> bool:
        """Whether this site trained in this run (judged per run, never by another run with the same model)."""
        return bool(self.rounds())

    def save_norm(self, server_round: int, tensors: dict[str, torch.Tensor], signature: str) -> Path:
        """Keep the tensors this site holds after training ``server_round``.

        Every round is kept, as the centre keeps every round's global checkpoint
        (``round-NNNN``, of which ``best`` and ``last`` are copies): any round a
        site command may name has its own tensors. They are the norm layers'
        parameters and statistics only, a few kilobytes to a few megabytes a
        round; deleting the run's folder deletes this site's model of the run.
        A failed write (disk full: OSError) leaves the files as they were.
        """
        recorded = self.info().get(SIGNATURE_META)
        if recorded not in (None, signature):
            raise SignatureMismatch(
                f"run {self.name} at this site trained model signature {recorded}, and now "
                f"{signature}: one run has one model; start a new run for another model."
            )
        path = self.norm_path(server_round)
        _save_tensors(path, tensors, {SIGNATURE_META: signature, ROUND_META: str(server_round)})
        self.record(**{SIGNATURE_META: signature, "last_round": server_round})
        if self.site is not None:  # what `fedseg-client status` shows; no run reads it back
            self.site.update_info(**{SIGNATURE_META: signature, "last_round": server_round, "last_run": self.name})
        return path

    def norm_for(self, model_round: int | None, signature: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(round, tensors) that go with global round ``model_round``'s shared weights; None: never trained by then.

        Global round r was aggregated from training round r, so it goes with the
        tensors of the last round this site trained at or before r (a site not
        sampled in round r still holds its earlier ones). ``None`` for
        ``model_round``: the latest round kept.
        """
        kept = [r for r in self.rounds() if model_round is None or r <= model_round]
        if not kept:
            return None
        tensors, _ = _checked_load(self.norm_path(kept[-1]), signature)
        return kept[-1], tensors

    # --- the personalized copy ----------------------------------------------------------------------------
    def save_personalized(
        self, tensors: dict[str, torch.Tensor], signature: str, server_round: int, facts: dict[str, Any]
    ) -> Path:
        """Keep the model cross-site evaluation fine-tuned and scored here, every tensor of it, with its facts.

        ``facts`` (steps, Dice before and after, the validation cases that chose
        the copy) is stored in run.json and in the file; the copy of the last
        cross-evaluated round is kept (the server sends the best round last).
        """
        path = self.folder / PERSONALIZED_FILE
        kept = {**facts, "round": server_round}
        _save_tensors(
            path, tensors, {SIGNATURE_META: signature, ROUND_META: str(server_round), "facts": json.dumps(kept)}
        )
        self.record(personalized=kept)
        return path

    def personalized(self, signature: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The personalized copy and its facts (round, steps, Dice, validation cases), or None if there is none."""
        path = self.folder / PERSONALIZED_FILE
        if not path.is_file():
            return None
        tensors, meta = _checked_load(path, signature)
        return tensors, json.loads(meta["facts"])

    # --- what this site measured --------------------------------------------------------------------------
    def record_score(self, server_round: int, **scores: Any) -> None:
        """Keep the Dice this site measured for round ``server_round``'s model (as paired here)."""
        kept = self.info().get("scores", {})
        kept[str(server_round)] = {**kept.get(str(server_round), {}), **scores}
        self.record(scores=kept)

    def score(self, server_round: int | None) -> dict[str, Any]:
        """What this site measured for ``server_round``'s model; {} if it measured nothing."""
        return self.info().get("scores", {}).get(str(server_round), {}) if server_round is not None else {}


class SiteState:
    """Reads and writes ``site.json``, the cache, and each run's state (``RunState``)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = private_dir(state_dir)  # it holds preprocessed scans: owner-only

    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE_DIR

    def prune_cache(self, keep_version: str) -> list[str]:
        """Remove the cache folders of every other plan version; returns their names.

        A new plan makes them dead weight, and each holds preprocessed scans.
        """
        if not self.cache_dir.is_dir():
            return []
        removed, keep = [], CACHE_PLAN_DIR.format(keep_version)
        for folder in self.cache_dir.iterdir():
            if folder.is_dir() and PLAN_CACHE.fullmatch(folder.name) and folder.name != keep:
                shutil.rmtree(folder)
                removed.append(folder.name)
        return removed

    def info(self) -> dict[str, Any]:
        path = self.root / SITE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_info(self, **fields: Any) -> None:
        atomic_write_text(
            self.root / SITE_FILE, json.dumps({**self.info(), **fields, "updated": time.time()}, indent=2)
        )

    # --- runs ---------------------------------------------------------------------------------------------
    def run(self, cfg: FedsegConfig) -> RunState:
        """This site's state of the run ``cfg`` belongs to (its ``federation.run_name`` and ``run_id``)."""
        return self.run_named(cfg.federation.run_name, cfg.federation.run_id)

    def run_named(self, run_name: str, run_id: str) -> RunState:
        """``<state_dir>/runs/<run_name>-<run_id>``; both were validated as folder-name safe by common/config/checks.py.

        A run configured without an identity (by hand, or a test) is kept under
        ``<run_name>-no-id``: every such run of that name shares it.
        """
        if not run_name:
            raise ValueError(
                "the run has no federation.run_name: a site keeps a run's model under its name and "
                "identity; start runs with fedseg-server start or fedseg-sim, which set both."
            )
        return self.run_folder(f"{run_name}-{run_id or NO_RUN_ID}")

    def run_folder(self, name: str) -> RunState:
        """The run kept in ``<state_dir>/runs/<name>``; ``name`` is a validated folder name
        (common/config/checks.py)."""
        self.migrate_legacy()
        return RunState(self.root / SITE_RUNS_DIR / name, self)

    def migrate_legacy(self) -> Path | None:
        """Move the one ``norm.safetensors`` of older fedseg versions into a run folder of its own, once.

        Which run wrote it was never recorded, so it is tied to no run: a new
        run starts from the global initialisation, and the tensors stay in
        ``runs/legacy-norm/`` for whoever knows which run they belonged to.
        """
        old = self.root / NORM_FILE
        if not old.is_file():
            return None
        info = self.info()
        signature, last_round = str(info.get(SIGNATURE_META) or "unknown"), int(info.get("last_round") or 0)
        legacy = RunState(self.root / SITE_RUNS_DIR / LEGACY_RUN, self)
        path = legacy.norm_path(last_round)
        _save_tensors(path, load_file(old), {SIGNATURE_META: signature, ROUND_META: str(last_round)})
        legacy.record(
            **{SIGNATURE_META: signature, "last_round": last_round, "migrated_from": str(old), "migrated": time.time()}
        )
        old.unlink()
        log.warning(
            "moved this site's norm tensors from %s (written before site state was kept per run; the run "
            "that wrote them is unknown) to %s. No run uses them: a new run starts from the global "
            "initialisation of its norm layers, unless site.norm_from_run: %s says to start from them.",
            old,
            path,
            LEGACY_RUN,
        )
        return path

    # --- the split ----------------------------------------------------------------------------------------
    def split(self, case_ids: list[str], val_fraction: float, seed: int, run: str = "") -> tuple[list[str], list[str]]:
        """The train/validation split (common.dataset.split_cases), recorded in site.json.

        Each case's side depends on the case alone, so adding cases never moves
        an existing one. A case whose recorded side would change (another seed
        or fraction, a split recorded by an older fedseg) is named in a warning,
        and the change is recorded with the run that saw it (``split_changes``).
        """
        train, val = split_cases(case_ids, val_fraction, seed)
        info = self.info()
        recorded = info.get("split") or {}
        before = {**{c: "train" for c in recorded.get("train", [])}, **{c: "val" for c in recorded.get("val", [])}}
        now = {**{c: "train" for c in train}, **{c: "val" for c in val}}
        moved = sorted(c for c in before.keys() & now.keys() if before[c] != now[c])
        if moved:
            log.warning(
                "the split of this site's cases changes: %s move between training and validation (split "
                "seed %d, validation fraction %s); validation Dice from before and after measures different "
                "cases. Recorded in %s under split_changes.",
                ", ".join(f"{c} ({before[c]} -> {now[c]})" for c in moved),
                seed,
                val_fraction,
                self.root / SITE_FILE,
            )
            changes = [
                *info.get("split_changes", []),
                {"time": time.time(), "run": run, "moved": {c: f"{before[c]}->{now[c]}" for c in moved}},
            ]
            self.update_info(
                split={"train": train, "val": val, "seed": seed, "val_fraction": val_fraction}, split_changes=changes
            )
        elif before != now or recorded.get("seed") != seed:
            self.update_info(split={"train": train, "val": val, "seed": seed, "val_fraction": val_fraction})
        return train, val
