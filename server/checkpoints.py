"""Global shared weights per round, plus best and last, in the run directory.

Every file is written to a temporary name and renamed, so a crash while
saving never leaves a truncated checkpoint behind; ``state.json`` says which
round ``last`` and ``best`` hold, and is what a restarted server resumes from.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

STATE_FILE = "state.json"
LAST, BEST = "last.safetensors", "best.safetensors"
ROUND_FILE = "round-{:04d}.safetensors"
"""Name of one round's aggregate; server/resume.py looks rounds up by it."""


@dataclass
class CheckpointState:
    last_round: int = 0
    best_round: int = 0
    best_dice: float = -1.0


class Checkpoints:
    """Saves and restores the global model of a run."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / STATE_FILE
        self.state = CheckpointState(**json.loads(path.read_text())) if path.is_file() else CheckpointState()

    def _write_state(self) -> None:
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self.state)))
        os.replace(tmp, self.dir / STATE_FILE)

    def _save(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        tmp = self.dir / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / name)

    def save_round(self, server_round: int, tensors: dict[str, torch.Tensor]) -> None:
        """Keep this round's aggregate as ``round-NNNN`` and as ``last``."""
        self._save(tensors, ROUND_FILE.format(server_round))
        shutil.copyfile(self.dir / ROUND_FILE.format(server_round), self.dir / (LAST + ".tmp"))
        os.replace(self.dir / (LAST + ".tmp"), self.dir / LAST)
        self.state.last_round = server_round
        self._write_state()

    def offer_best(self, server_round: int, dice: float) -> bool:
        """Make the round's model ``best`` if its federation Dice beats the best so far."""
        if dice <= self.state.best_dice:
            return False
        shutil.copyfile(self.dir / ROUND_FILE.format(server_round), self.dir / (BEST + ".tmp"))
        os.replace(self.dir / (BEST + ".tmp"), self.dir / BEST)
        self.state.best_round, self.state.best_dice = server_round, dice
        self._write_state()
        return True
