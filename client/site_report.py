"""Pictures of the model's segmentations, drawn at the site from the site's own scans, and kept there.

    fedseg-client report --config site.yaml --run RUN_DIR [--weights best|last|round-N] [--out DIR] [--cases N]

For each of the first N validation cases: an axial slice through the most
ground-truth foreground, drawn three times (the scan, the ground truth
overlaid, the prediction overlaid) with the case's Dice, a legend of each
class's name (from the site's dataset.json) and colour, as a PNG in
``<state_dir>/report/`` (or ``--out``). The model is the run's round that
``predict`` and ``export`` use by default (the centre's best, else its last;
``--weights`` picks another) with this site's own normalization tensors of that
round; each picture's title names the round.

A picture of a scan is patient data: this command only writes local files.
Nothing here builds a Flower message, and the egress guard (client/egress.py)
refuses any reply that carries an image, a picture or any other array outside
the model signature. The simulation draws the same pictures for every
simulated site into that site's folder, on the machine that holds the data.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from common.cli import add_weights_argument
from common.config import FedsegConfig
from common.private import private_file
from common.runs import REPORT_DIR

log = logging.getLogger("fedseg.client")

CLASS_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]
OVERLAY_ALPHA = 0.45


def axial_index(truth: np.ndarray) -> int:
    """The axial slice (last axis, superior in plan space) with the most foreground; the middle if none."""
    per_slice = (truth > 0).reshape(-1, truth.shape[-1]).sum(0)
    return int(per_slice.argmax()) if per_slice.any() else truth.shape[-1] // 2


def case_dice(truth: np.ndarray, prediction: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice of one case (a class absent from both maps scores 1)."""
    from monai.metrics import compute_dice

    pred, true = (_one_hot(a, num_classes) for a in (prediction, truth))
    return float(compute_dice(pred, true, include_background=False, ignore_empty=False).mean())


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    import torch

    """[X, Y, Z] integer labels -> [1, C, X, Y, Z] one-hot, MONAI's metric layout."""
    return torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), num_classes).movedim(-1, 0)[None]


def class_names(labels: Mapping[str, int], agreed: Sequence[int], num_classes: int) -> list[str]:
    """The name of each of the model's classes, in this site's own words.

    The model's class i is the federation's label value i, whose name code is
    ``agreed[i]`` (the plan's label_codes); the site's dataset.json names it.
    Without an agreed coding (an older plan) the site's own values are the
    model's; a class no name fits is called by its number.
    """
    from common.labels import name_code

    by_code = {name_code(name): name for name in labels}
    by_value = {value: name for name, value in labels.items()}
    if len(agreed) == num_classes:
        return [by_code.get(code, f"class {i}") for i, code in enumerate(agreed)]
    return [by_value.get(i, f"class {i}") for i in range(num_classes)]


def overlay_figure(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, names: Sequence[str], title: str):
    """One axial slice: the scan, ground truth overlaid, prediction overlaid, with a legend of the classes.

    A clinician reads the overlay by colour, so each foreground class's name
    and colour are in the legend and its names in the title; background is not
    drawn. Returns the matplotlib figure (``draw_overlay`` writes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.patches import Patch

    num_classes = len(names)
    k = axial_index(truth)
    scan = image[0, :, :, k].T  # x to the right, y upwards with origin="lower"
    colours = ListedColormap(CLASS_COLOURS[: max(1, num_classes - 1)])
    scale = Normalize(vmin=1, vmax=max(1, num_classes - 1))
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 4.2))
    for ax, (name, labels) in zip(
        axes, (("scan", None), ("ground truth", truth), ("prediction", prediction)), strict=True
    ):
        ax.imshow(scan, cmap="gray", origin="lower")
        if labels is not None:
            mask = np.ma.masked_equal(labels[:, :, k].T, 0)
            ax.imshow(mask, cmap=colours, norm=scale, alpha=OVERLAY_ALPHA, origin="lower", interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    foreground = list(enumerate(names))[1:]
    fig.suptitle(f"{title} (axial slice {k})\nclasses: {', '.join(n for _, n in foreground)}")
    fig.legend(
        handles=[Patch(facecolor=colours(scale(i)), edgecolor="black", label=n) for i, n in foreground],
        loc="lower center",
        ncol=max(1, min(len(foreground), 6)),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def draw_overlay(
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    num_classes: int,
    title: str,
    path: Path,
    names: Sequence[str] = (),
) -> Path:
    """``overlay_figure`` written as a PNG; ``names`` are the classes' names (default: their numbers)."""
    import matplotlib.pyplot as plt

    fig = overlay_figure(image, truth, prediction, list(names) or [f"class {i}" for i in range(num_classes)], title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(private_file(path), dpi=100)  # a slice of a scan, the case id in title and name: owner-only
    plt.close(fig)
    return path


def site_pictures(
    site_cfg: FedsegConfig,
    run: Path,
    weights: str | None = None,
    out: Path | None = None,
    cases: int = 1,
    show: Callable[[str], None] = print,
) -> list[Path]:
    """Draw the first ``cases`` validation cases of this site with the run's model; returns the PNG paths.

    ``site_cfg`` is the site's own config (site.yaml): its data, its state
    directory (norm tensors, split, cache), its threads. A site with no norm
    tensors of its own (it never trained) and a BatchNorm model first
    re-estimates the statistics on its own scans, as ``fedseg-client predict``
    does there: the statistics the model arrives with describe no scanner.
    """
    import torch

    from common.device import compute_for, with_site_compute
    from common.norm_adapt import adapt_norm, has_batch_norm
    from common.preprocess import PreprocessedCases
    from common.sampling import fuse

    from .site_data import open_split
    from .site_model import load_run_model
    from .site_state import SiteState
    from .slab_inferer import InferenceOptions, SlabInferer

    state = SiteState(Path(site_cfg.site.state_dir))
    loaded = load_run_model(Path(run), weights, state.root, missing_local="quiet")
    model, plan, run_cfg, own = loaded.model, loaded.plan, loaded.cfg, loaded.own
    show(f"site {site_cfg.site.name}: drawing with {loaded.describe()}")
    cfg = run_cfg.replace(site=site_cfg.site)
    spec, train_ids, val_ids = open_split(cfg, state)
    store = PreprocessedCases(state.cache_dir, plan, spec.num_classes)
    train = with_site_compute(run_cfg.train, site_cfg.train)
    options = InferenceOptions(train.sw_overlap, train.sw_batch_size, compute_for(train))
    adapted = not own and has_batch_norm(model) and train.adapt_norm_steps > 0
    if adapted:  # each AdaBN batch comes from one scan: more scans than batches would only be preprocessed
        images = [store.load(spec.case(i)).image for i in (val_ids + train_ids)[: train.adapt_norm_steps]]
        adapt_norm(
            model,
            images,
            plan.data_config(run_cfg.data),
            train.adapt_norm_steps,
            train.batch_size,
            train.seed,
            options.compute.device,
        )
        show(
            f"site {site_cfg.site.name} never trained in this run: re-estimated the BatchNorm statistics on its "
            f"{len(images)} scan(s) before drawing"
        )
    inferer = SlabInferer(model, plan.patch_size, spec.num_classes, options)
    folder = out or state.root / REPORT_DIR
    names = class_names(spec.labels, plan.label_codes, spec.num_classes)
    written = []
    for case_id in val_ids[:cases]:
        image, labels = store.load(spec.case(case_id))
        truth = fuse(np.asarray(labels), spec.num_classes)[0]
        prediction = inferer(torch.from_numpy(np.array(image, dtype=np.float32)))
        dice = case_dice(truth, prediction, spec.num_classes)
        title = (
            f"site {site_cfg.site.name}, round {loaded.checkpoint.round or '?'}, validation case {case_id}: "
            f"Dice {dice:.3f}" + (" (BatchNorm statistics adapted here)" if adapted else "")
        )
        written.append(
            draw_overlay(
                np.asarray(image),
                truth,
                prediction,
                spec.num_classes,
                title,
                folder / f"{site_cfg.site.name}-{case_id}.png",
                names,
            )
        )
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", type=Path, required=True, help="Run folder from the centre (config.yaml, plan.json, checkpoints/)."
    )
    add_weights_argument(parser, ", as in predict and export")
    parser.add_argument("--out", type=Path, help="Folder for the pictures (default: <state_dir>/report).")
    parser.add_argument("--cases", type=int, default=1, help="Validation cases to draw (default 1).")


def run(args: argparse.Namespace) -> int:
    from common.cli import UserError, config_from_args

    cfg = config_from_args(args)
    if not cfg.site.state_dir or not cfg.site.data_dir:
        raise UserError("site.yaml must set site.data_dir and site.state_dir (the site's own data and state).")
    import torch

    torch.set_num_threads(cfg.site.torch_threads)
    for path in site_pictures(cfg, args.run, args.weights, args.out, args.cases):
        print(f"wrote {path}")
    print("These pictures show patient data: they stay at this site.")
    return 0
