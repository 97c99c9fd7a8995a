"""The centre's start model from pretrained weights (``model.init_weights``) instead of the seeded random init.

A weights file is hostile input: it may come from anywhere (a MONAI bundle
downloaded from a model zoo, another group's export). So a file that would run
code when loaded (a pickle holding Python objects) is refused before anything
is built from it, its size is bounded, and every tensor taken must be floating
point and finite. Tensors are mapped onto the run's model by name and shape
only; nothing is reshaped, and a model is never changed to fit the file, so
the model signature every site checks is the one the run's configuration
gives (tested).

What travels is what the sites start from: the file's values of the
travelling tensors. The tensors ``train.norm_mode`` keeps at the sites (FedBN's
normalization layers) never come from the centre, so each site starts those
from the seeded init as in every run; they are reported as such.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.config import FedsegConfig
from common.metrics_log import Event, MetricsLog
from common.params import ParameterSplit, model_signature, run_model, select
from common.runs import BEST_CHECKPOINT, CHECKPOINT_DIR, LAST_CHECKPOINT, WEIGHTS_FILE

log = logging.getLogger("fedseg.server")

MAX_FILE_BYTES = 4 * 1024**3
"""Larger than any 3D segmentation network's weights (nnU-Net's biggest are some hundred MB)."""
BUNDLE_WEIGHTS = Path("models") / "model.pt"
"""Where a MONAI bundle keeps its weights (a state dict saved with torch.save)."""
STATE_DICT_KEYS = ("state_dict", "model", "network")
"""Keys under which checkpoints commonly nest the state dict ({"model": ..., "optimizer": ...})."""
WRAPPER_PREFIX = "module."
"""What torch.nn.DataParallel puts in front of every name."""
EVENT = Event.INIT_WEIGHTS
"""The metrics log event that records what the start model took from the file."""
MAX_LISTED = 100
"""Names listed per kind in the log and the event (a hostile file may hold millions of tensors); the counts are
whole."""


class PretrainedError(ValueError):
    """The weights file cannot be used: the message names the file and what to do."""


@dataclass(frozen=True)
class PretrainedLoad:
    """What the start model took from the file, for the log and the metrics log."""

    source: str
    sha256: str
    loaded: list[str]
    """Travelling tensors the run starts from the file's values."""
    at_sites: list[str]
    """Tensors the file has, but that ``norm_mode`` keeps at the sites: each site starts them from the seeded init."""
    skipped: list[str]
    """The file's tensors that do not fit the model: 'name (why)'."""
    new: list[str]
    """Travelling tensors the file lacks: the seeded random init."""

    def fields(self) -> dict[str, object]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "loaded": len(self.loaded),
            "at_sites": len(self.at_sites),
            "skipped": self.skipped[:MAX_LISTED],
            "skipped_total": len(self.skipped),
            "new": self.new[:MAX_LISTED],
            "new_total": len(self.new),
        }


def weights_file(path: Path) -> Path:
    """The weights file that ``path`` names: a file, an export folder, a run folder or a MONAI bundle folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (
            path / WEIGHTS_FILE,
            path / CHECKPOINT_DIR / BEST_CHECKPOINT,
            path / CHECKPOINT_DIR / LAST_CHECKPOINT,
            path / BUNDLE_WEIGHTS,
        ):
            if candidate.is_file():
                return candidate
        raise PretrainedError(
            f"model.init_weights: {path} is a folder without weights: give a fedseg export folder "
            f"({WEIGHTS_FILE}), a run folder ({CHECKPOINT_DIR}/{BEST_CHECKPOINT}), a MONAI bundle ({BUNDLE_WEIGHTS}) "
            "or the weights file itself."
        )
    raise PretrainedError(
        f"model.init_weights: {path} does not exist (a relative path is taken from the folder the "
        "centre runs in; give an absolute path)."
    )


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The named tensors of a .safetensors file or a torch.save'd state dict, never running code from it."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PretrainedError(
            f"{path} is {size / 1e9:.1f} GB, more than the {MAX_FILE_BYTES / 1e9:.0f} GB a "
            "segmentation network's weights take: is it the right file?"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise PretrainedError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PretrainedError(
            f"{path} holds pickled Python objects, and loading them would run code from the file, so it is refused "
            f"({_refused_object(err)}). Where the file comes from a source you trust, save only its weights: "
            "torch.save(model.state_dict(), 'model.pt'), or convert them to .safetensors."
        ) from err
    except Exception as err:  # noqa: BLE001 - a malformed file fails anywhere inside torch's reader
        raise PretrainedError(
            f"{path} is not a torch.save file fedseg can read ({err}); give a .safetensors file, "
            "a state dict saved with torch.save, or an export folder."
        ) from err
    return _state_dict(loaded, path)


def _refused_object(err: pickle.UnpicklingError) -> str:
    """The object torch's weights-only unpickler refused, without its advice to load the file unsafely."""
    for line in str(err).splitlines():
        if "Unsupported global:" in line:
            name = line.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
            return f"it asks for the Python object {name.removeprefix('GLOBAL ')}"
    return "it holds an object that is not a tensor"


def _state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor map of a loaded checkpoint (possibly nested under 'state_dict' or 'model')."""
    if isinstance(loaded, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if (
        not isinstance(loaded, dict)
        or not loaded
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise PretrainedError(
            f"{path} holds no state dict (names mapped to tensors); save the network's "
            "weights with torch.save(model.state_dict(), ...)."
        )
    if all(k.startswith(WRAPPER_PREFIX) for k in loaded):
        loaded = {k[len(WRAPPER_PREFIX) :]: v for k, v in loaded.items()}
    return loaded


def overlay(model: nn.Module, split: ParameterSplit, tensors: dict[str, torch.Tensor], path: Path) -> PretrainedLoad:
    """Copy every tensor of ``tensors`` whose name and shape the model has into it; report what happened."""
    state = model.state_dict()
    taken, skipped = set(), []
    for name, tensor in sorted(tensors.items()):
        target = state.get(name)
        if target is None:
            skipped.append(f"{name} (no tensor of that name in the model)")
        elif tuple(tensor.shape) != tuple(target.shape):
            skipped.append(f"{name} (shape {list(tensor.shape)}, the model's {list(target.shape)})")
        elif target.is_floating_point() != tensor.is_floating_point():
            skipped.append(f"{name} (dtype {tensor.dtype}, the model's {target.dtype})")
        else:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise PretrainedError(
                    f"{path}: tensor {name} holds NaN or infinite values; a start model must be "
                    "finite (was it saved from a diverged run?)."
                )
            taken.add(name)
    if not taken & set(split.travelling):
        raise PretrainedError(
            f"none of the {len(tensors)} tensors of {path} fits the run's model by name and shape (first: "
            f"{skipped[0] if skipped else 'none'}): it was trained with another model.arch, model.channels, "
            "model.strides, model.num_res_units or model.norm; set them as that model had them."
        )
    with torch.no_grad():
        for name in taken:
            state[name].copy_(tensors[name].to(state[name].dtype))
    travelling = set(split.travelling)
    return PretrainedLoad(
        source=str(path),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        loaded=sorted(taken & travelling),
        at_sites=sorted(taken - travelling),
        skipped=skipped,
        new=sorted(travelling - taken),
    )


def load_pretrained(cfg: FedsegConfig, model: nn.Module, split: ParameterSplit) -> PretrainedLoad:
    """Put ``model.init_weights`` into ``model`` (built by ``run_model``), keeping its signature."""
    path = weights_file(Path(cfg.model.init_weights))
    before = model_signature(model, split)
    result = overlay(model, split, read_tensors(path), path)
    if model_signature(model, split) != before:  # copy_ keeps names, shapes and dtypes: this guards that promise
        raise PretrainedError(f"loading {path} changed the model signature; this is a bug in fedseg.")
    return result


def start_weights(cfg: FedsegConfig, metrics_log: MetricsLog | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The run's start model (the seeded init, or ``model.init_weights`` over it) and the model signature."""
    model, split, signature = run_model(cfg)
    if cfg.model.init_weights:
        result = load_pretrained(cfg, model, split)
        log.info(
            "start model from %s: %d tensor(s) loaded, %d kept at the sites (seeded there), %d skipped, "
            "%d newly initialised",
            result.source,
            len(result.loaded),
            len(result.at_sites),
            len(result.skipped),
            len(result.new),
        )
        for line in result.skipped[:MAX_LISTED]:
            log.info("  skipped %s", line)
        for name in result.new[:MAX_LISTED]:
            log.info("  newly initialised %s", name)
        if metrics_log is not None:
            metrics_log.write(EVENT, **result.fields())
    return select(model, split.travelling), signature
