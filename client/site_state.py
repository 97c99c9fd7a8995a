"""A site's private state directory, which never leaves the site.

Local normalization tensors are written atomically (temporary file, fsync,
rename), so a crash mid-write leaves the previous tensors intact, and they
are reloaded after every restart of the site and in every new run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from common.files import atomic_save
from common.private import private_dir
from common.runs import CACHE_DIR, NORM_FILE, SITE_FILE

PLAN_CACHE = re.compile(r"plan-[0-9a-f]{12}")
"""Cache folders are named after the plan version (common/preprocess.py); nothing else there is removed."""

log = logging.getLogger(__name__)


def _atomic_replace(tmp: Path, path: Path) -> None:
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SiteState:
    """Reads and writes ``<state_dir>/norm.safetensors`` and ``site.json``."""

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
        removed = []
        for folder in self.cache_dir.iterdir():
            if folder.is_dir() and PLAN_CACHE.fullmatch(folder.name) and folder.name != f"plan-{keep_version}":
                shutil.rmtree(folder)
                removed.append(folder.name)
        return removed

    def info(self) -> dict[str, Any]:
        path = self.root / SITE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_info(self, **fields: Any) -> None:
        info = {**self.info(), **fields, "updated": time.time()}
        path = self.root / SITE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        _atomic_replace(tmp, path)

    def load_local(self, signature: str) -> dict[str, torch.Tensor] | None:
        """The site's local tensors for this model, or None on the site's first round.

        Tensors saved for a different model signature cannot be loaded into this
        model; they are set aside (renamed, not deleted) and the site starts from
        the global initialisation.
        """
        path = self.root / NORM_FILE
        if not path.is_file():
            return None
        stored = self.info().get("model_signature")
        if stored != signature:
            aside = path.with_name(f"norm.{stored or 'unknown'}.safetensors")
            log.warning(
                "local tensors in %s belong to model signature %s, not %s; moved to %s and starting "
                "this site's normalization layers from the global initialisation",
                path, stored, signature, aside.name,
            )
            os.replace(path, aside)
            return None
        return load_file(path)

    def save_local(self, tensors: dict[str, torch.Tensor], server_round: int, signature: str) -> None:
        """Replace the local tensors atomically; a failed write (disk full: OSError) leaves the old file whole."""
        payload = save({k: v.contiguous() for k, v in tensors.items()})
        atomic_save(self.root / NORM_FILE, lambda tmp: tmp.write_bytes(payload))
        self.update_info(model_signature=signature, last_round=server_round)
