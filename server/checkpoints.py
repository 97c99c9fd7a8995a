"""Global shared weights per round, plus best and last, in the run directory.

Every file is written to a temporary name and renamed, so a crash while
saving never leaves a truncated checkpoint behind; ``state.json`` says which
round ``last`` and ``best`` hold, and is what a restarted server resumes from.
Every checkpoint is owner-only (0600) whatever the umask: ``best`` and
``last`` are copies of a round's weights and deserve the same protection.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_copy, atomic_save, atomic_write_text
from common.metrics_log import Event, MetricsLog
from common.runs import (
    BEST_CHECKPOINT,
    CHECKPOINT_STATE,
    LAST_CHECKPOINT,
    ROUND_CHECKPOINT,
    SERVER_OPTIMIZER_CHECKPOINT,
    parse_checkpoint_name,
)


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
        path = self.dir / CHECKPOINT_STATE
        self.state = CheckpointState(**json.loads(path.read_text())) if path.is_file() else CheckpointState()

    def _write_state(self) -> None:
        atomic_write_text(self.dir / CHECKPOINT_STATE, json.dumps(asdict(self.state)))

    def _save(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        atomic_save(self.dir / name, lambda tmp: save_file(contiguous, str(tmp)), private=True)

    def _copy(self, source: str, name: str) -> None:
        """``name`` becomes an owner-only copy of checkpoint ``source`` (a plain copy would follow the umask)."""
        atomic_copy(self.dir / source, self.dir / name, private=True)

    def save_round(self, server_round: int, tensors: dict[str, torch.Tensor]) -> None:
        """Keep this round's aggregate as ``round-NNNN`` and as ``last``."""
        self._save(tensors, ROUND_CHECKPOINT.format(server_round))
        self._copy(ROUND_CHECKPOINT.format(server_round), LAST_CHECKPOINT)
        self.state.last_round = server_round
        self._write_state()

    def saved_rounds(self, upto: int) -> list[int]:
        """Rounds up to ``upto`` with a model checkpoint, newest first (a round skipped below quorum has none)."""
        return [r for r in range(upto, 0, -1) if (self.dir / ROUND_CHECKPOINT.format(r)).is_file()]

    def round_weights(self, server_round: int) -> dict[str, torch.Tensor]:
        """The global model saved after ``server_round``."""
        return load_file(self.dir / ROUND_CHECKPOINT.format(server_round))

    def save_optimizer(self, server_round: int, moments: dict[str, np.ndarray]) -> None:
        """Keep the server optimizer's moments after this round's step (written before the round's model,
        so every round checkpoint a resume may pick has its moments beside it)."""
        self._save(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in moments.items()},
            SERVER_OPTIMIZER_CHECKPOINT.format(server_round),
        )

    def optimizer(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The moments saved after ``server_round``'s step, or None if there are none."""
        path = self.dir / SERVER_OPTIMIZER_CHECKPOINT.format(server_round)
        return {k: v.numpy() for k, v in load_file(path).items()} if path.is_file() else None

    def round_of(self, name: str) -> int | None:
        """The round a checkpoint name holds: ``best``, ``last``, ``round-N``; None for anything else."""
        named = parse_checkpoint_name(name)
        if named is None:
            return None
        if named.round is not None:
            return named.round
        return getattr(self.state, f"{named.alias}_round") or None

    def offer_best(self, server_round: int, dice: float) -> bool:
        """Make the round's model ``best`` if its federation Dice beats the best so far."""
        if dice <= self.state.best_dice:
            return False
        self._copy(ROUND_CHECKPOINT.format(server_round), BEST_CHECKPOINT)
        self.state.best_round, self.state.best_dice = server_round, dice
        self._write_state()
        return True


def log_run_end(metrics_log: MetricsLog, status: str, state: CheckpointState) -> None:
    """The run's last metrics-log line, whatever ended it, and the log closed: how far it got and its best model."""
    metrics_log.write(
        Event.RUN_END,
        status=status,
        rounds_completed=state.last_round,
        best_round=state.best_round,
        best_dice=state.best_dice,
    )
    metrics_log.close()
