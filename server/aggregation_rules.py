"""The rules that combine the shared tensors of the sites that passed validation: the mean and robust ones.

- ``mean``: the weighted mean sum_k (n_k / n) w_k, fedseg's default (FedAvg/FedProx).
- ``trimmed_mean``: per coordinate, drop the ``trim_fraction`` smallest and
  largest site values and average the rest.
- ``median``: per coordinate, the median of the site values.

With ``clip_updates``, every update w_k - w^t longer than the median of the
sites' update norms is first scaled down to that median (norm clipping, Sun
et al. 2019): a site can then pull the model no further than a typical site,
whatever it sends, while honest updates of ordinary size pass unchanged.

The robust aggregators give every site one vote instead of weighting by
``num-examples``: that count is reported by the site itself, so a hostile site
could claim millions of cases and take over a weighted median. Everything is
computed in float32, one tensor at a time, so memory grows with the number of
sites times the largest tensor, not times the whole model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

from common.config import FederationConfig

from .validation import update_norm

log = logging.getLogger("fedseg.server")


def _stack(records: Sequence[ArrayRecord], key: str) -> np.ndarray:
    """(sites, *shape) float32 values of one tensor."""
    return np.stack([_values(r[key]) for r in records])


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.tensordot(weights / weights.sum(), values, axes=1).astype(np.float32)


def trimmed_mean(values: np.ndarray, trim: int) -> np.ndarray:
    """Mean over sites of each coordinate after dropping its ``trim`` lowest and highest values."""
    ordered = np.sort(values, axis=0)
    return ordered[trim : values.shape[0] - trim].mean(axis=0, dtype=np.float32)


def coordinate_median(values: np.ndarray) -> np.ndarray:
    return np.median(values, axis=0).astype(np.float32)


def trim_count(n_sites: int, trim_fraction: float) -> int:
    """Sites dropped at each end; at least one site always remains."""
    return min(math.floor(trim_fraction * n_sites), (n_sites - 1) // 2)


def clip_updates(records: Sequence[ArrayRecord], reference: dict[str, np.ndarray]) -> list[ArrayRecord]:
    """Each record with its update w_k - w^t scaled down to the median update norm (never up)."""
    norms = [update_norm(r, reference) for r in records]
    limit = float(np.median(norms))
    clipped = []
    for record, norm in zip(records, norms, strict=True):
        if norm <= limit:
            clipped.append(record)
            continue
        scale = np.float32(limit / norm)
        clipped.append(
            ArrayRecord(
                {
                    key: Array(np.ascontiguousarray(reference[key] + scale * (_values(array) - reference[key])))
                    for key, array in record.items()
                }
            )
        )
    return clipped


def _values(array: Array) -> np.ndarray:
    return array.numpy().astype(np.float32, copy=False)


def aggregate(
    records: Sequence[ArrayRecord],
    weights: Sequence[float],
    cfg: FederationConfig,
    reference: dict[str, np.ndarray] | None = None,
) -> ArrayRecord:
    """Combine the sites' travelling tensors with ``cfg.aggregator``; keys in the first record's order.

    ``reference`` is the round's global model w^t, needed for ``cfg.clip_updates``.
    """
    if not records:
        raise ValueError("nothing to aggregate: no site reply passed validation")
    if cfg.clip_updates and reference is not None and len(records) > 1:
        records = clip_updates(records, reference)
    trim = trim_count(len(records), cfg.trim_fraction)
    if cfg.aggregator == "trimmed_mean" and trim == 0:
        log.warning(
            "trimmed_mean with %d site(s) and trim_fraction %.2f drops no site: this round is a plain mean",
            len(records),
            cfg.trim_fraction,
        )
    w = np.asarray(weights, dtype=np.float64)
    combined = {}
    for key in records[0].keys():
        values = _stack(records, key)
        if cfg.aggregator == "median":
            combined[key] = coordinate_median(values)
        elif cfg.aggregator == "trimmed_mean" and trim > 0:
            combined[key] = trimmed_mean(values, trim)
        else:
            combined[key] = weighted_mean(values, w if cfg.aggregator == "mean" else np.ones_like(w))
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in combined.items()})
