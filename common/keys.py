"""Record keys and metric names both sides of the wire agree on."""

ARRAYS = "arrays"
"""The ArrayRecord of travelling tensors."""
CONFIG = "config"
"""The ConfigRecord sent by the server (round, mu, ...)."""
METRICS = "metrics"
"""The MetricRecord of a site's reply."""
IDENTITY = "identity"
"""The ConfigRecord naming the replying site and its model signature."""
LAYOUT = "layout"
"""The ConfigRecord that says how the packed ``ARRAYS`` unpack into named tensors (common/wire.py)."""
EVALUATION = "evaluation"
"""MetricRecord of a training reply: the site's evaluation of the global model it received, i.e. of the
previous round's model. It rides with the training so that a round costs one message per site."""

NUM_EXAMPLES = "num-examples"
PROXIMAL_MU = "proximal-mu"
SERVER_ROUND = "server-round"
SIGNATURE = "model-signature"
SITE = "site"
WIRE_DTYPE = "wire-dtype"
EVALUATE_RECEIVED = "evaluate-received"
"""ConfigRecord entry of a training message: evaluate the received model before training (``EVALUATION``)."""

RUN_CONFIG_KEY = "fedseg-config"
SIM_SITES_KEY = "fedseg-sim-sites"
"""Simulation only: the run config's folder of per-partition site.yaml files (a deployed site names its own)."""
"""Run-config entry that carries the resolved federation YAML to both apps."""
NODE_SITE_CONFIG = "site-config"
"""Node-config entry: path of the site's site.yaml (deployment)."""
NODE_PARTITION_ID = "partition-id"
"""Node-config entry set by Flower's simulation engine."""

TRAIN_METRICS = ("loss", "proximal_loss", "duration_s", NUM_EXAMPLES)
LEARNING_RATE = "lr"
"""Training metric: the learning rate of the round's first local step, so the centre can see the schedule."""
NO_SCORE = "no_score"
"""Training metric, 1: the site was asked to score the model it received but has fewer validation cases than
its cohort floor (site.min_cohort), so it trained and sends no evaluation."""
EVAL_REQUIRED = ("dice", "loss", NUM_EXAMPLES)
DICE_CLASS_PREFIX = "dice_class_"

CROSS_EVAL_ACTION = "cross_eval"
"""Query action of the cross-site evaluation: messages of type ``query.cross_eval``."""
CROSS_EVAL_TASK = "cross-eval-task"
"""ConfigRecord entry of a cross-site evaluation query: ``identify`` or ``evaluate``."""
CROSS_EVAL_MODEL = "cross-eval-model"
"""ConfigRecord entry naming the checkpoint being evaluated (best, last, round-0003)."""
TEST_DICE = "test_dice"
TEST_DICE_PERSONAL = "test_dice_personal"
TEST_NUM_EXAMPLES = "test-num-examples"
TEST_DICE_CLASS_PREFIX = "test_dice_class_"
"""A site's labelled test cases (imagesTs/labelsTs), scored in the cross-site evaluation only."""
CROSS_EVAL_METRICS = (
    "dice",
    "dice_adapted",
    "dice_personal",
    "trained",
    NUM_EXAMPLES,
    TEST_DICE,
    TEST_DICE_PERSONAL,
    TEST_NUM_EXAMPLES,
)
"""Numeric metrics a site returns to a cross-site evaluation query (dice_adapted only if it never trained,
dice_personal only if it trained and personalizes, test_* only if it has labelled test cases), besides one
DICE_CLASS_PREFIX<i> and TEST_DICE_CLASS_PREFIX<i> per foreground class."""

FINGERPRINT_ACTION = "fingerprint"
"""Query action asking every site for its data fingerprint before training (server/planning.py)."""
PLAN = "plan"
"""ConfigRecord entry of train/evaluate messages: the federation's plan as JSON (common/plan.py)."""
MAX_ANNOTATORS = 8
ANNOTATOR_METRICS = ("dice_fusion", *(f"dice_annotator_{i}" for i in range(1, MAX_ANNOTATORS + 1)))
"""Evaluation of cases with several label files: Dice against their fusion and against each annotator."""

# --- What may leave a site (client/egress.py enforces it; server/validation.py expects it) ---
EVAL_METRICS = (*EVAL_REQUIRED, "hd95", *ANNOTATOR_METRICS)
"""Every scalar an evaluation reply may carry, besides one DICE_CLASS_PREFIX<i> per foreground class."""
FINGERPRINT = "fingerprint"
"""MetricRecord of a site's data fingerprint: aggregate statistics only."""
FINGERPRINT_PREFIX = "fp_"
"""Every fingerprint metric's name starts with this; values are numbers or short lists of numbers."""
TIMELINE_METRICS = (
    "t_delivered",
    "t_process_started",
    "t_bundle_checked",
    "t_imports_done",
    "t_data_ready",
    "t_work_done",
)
"""Unix times (site clock) at which a message passed the site's stages; the server's timeline
(server/receiving_grid.py)."""
EGRESS_MAX_LIST = 16
"""Longest numeric list one metric may hold: enough for percentiles, too short for an image patch."""
CONTENT_SHA256 = "sha256"
"""Field of a site's egress.jsonl line and of the server's train event: common.digest.content_sha256."""
