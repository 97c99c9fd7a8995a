"""Record keys and metric names both sides of the wire agree on."""

ARRAYS = "arrays"
"""The ArrayRecord of travelling tensors."""
CONFIG = "config"
"""The ConfigRecord sent by the server (round, mu, ...)."""
METRICS = "metrics"
"""The MetricRecord of a site's reply."""
IDENTITY = "identity"
"""The ConfigRecord naming the replying site and its model signature."""

NUM_EXAMPLES = "num-examples"
PROXIMAL_MU = "proximal-mu"
SERVER_ROUND = "server-round"
SIGNATURE = "model-signature"
SITE = "site"
WIRE_DTYPE = "wire-dtype"

RUN_CONFIG_KEY = "fedseg-config"
"""Run-config entry that carries the resolved federation YAML to both apps."""
NODE_SITE_CONFIG = "site-config"
"""Node-config entry: path of the site's site.yaml (deployment)."""
NODE_PARTITION_ID = "partition-id"
"""Node-config entry set by Flower's simulation engine."""

TRAIN_METRICS = ("loss", "proximal_loss", "duration_s", NUM_EXAMPLES)
EVAL_REQUIRED = ("dice", "loss", NUM_EXAMPLES)
DICE_CLASS_PREFIX = "dice_class_"
