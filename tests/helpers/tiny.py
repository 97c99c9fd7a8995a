"""The one tiny setting the tests build on: a model and training small enough for a 2-core CI machine.

A test adds only what it is about, as overrides after ``tiny()`` (later ones
win); the deployment harness writes the same ``TINY`` into federation.yaml.
The model's channels and classes are the synthetic sites' (one image channel,
background and foreground), so a test can build a model without data; a test
of other data sets them to 0, which leaves them to the sites' dataset.json.
"""

from __future__ import annotations

import json
from typing import Any

TINY: dict[str, dict[str, Any]] = {
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "in_channels": 1, "out_channels": 2},
    "data": {"patch_size": [16, 16, 16]},
    "train": {"local_steps": 2, "batch_size": 1, "hd95": False},
}


def tiny(*overrides: str) -> list[str]:
    """``TINY`` as ``section.key=value`` overrides (load_config's form), then ``overrides``."""
    base = [
        f"{section}.{key}={json.dumps(value)}" for section, options in TINY.items() for key, value in options.items()
    ]
    return [*base, *overrides]
