"""The site's side of the cross-site evaluation (``query.cross_eval`` messages).

The server sends a global checkpoint; the site scores it on its own validation
cases with its own normalization tensors, which never leave it, and on its
labelled test cases when it has any (scored here only, never used to choose a
round). A site that never trained has no norm tensors and no reason to hold
cases back: it scores the checkpoint on all its labelled cases as it arrives,
and again after adapting its normalization layers to those scans' images
(common.norm_adapt). Only Dice values and counts go back; the site keeps the
Dice it measured for each round, and the personalized copy it scored, with the
run (client/site_state.py).
"""

from __future__ import annotations

import logging

from flwr.app import Message

from common import keys
from common.device import compute_for
from common.evaluation import evaluate
from common.norm_adapt import adapt_norm
from common.personalize import personalize
from common.records import number

from .site import Site
from .site_data import SiteData, require_cohort

log = logging.getLogger("fedseg.client")
IDENTIFY, EVALUATE = "identify", "evaluate"


def has_trained(site: Site) -> bool:
    """A site trained in this run exactly when it keeps norm tensors of this run (never judged by another run)."""
    return site.run.trained


def cross_evaluate(site: Site, msg: Message) -> Message:
    """Answer an ``identify`` or ``evaluate`` cross-evaluation query.

    ``identify`` only looks at which rounds this run keeps: it reads no tensor
    file and changes none, whatever model the message is about. ``evaluate``
    scores the shared weights of the round the message names with this site's
    tensors of that round (client/site.py), and keeps what it measured, and the
    personalized copy it scored, in the run's state at this site.
    """
    config = msg.content[keys.CONFIG]
    task = str(config[keys.CROSS_EVAL_TASK])
    trained = has_trained(site)
    if task == IDENTIFY:
        return site.reply(msg, {"trained": float(trained), keys.NUM_EXAMPLES: 1})
    if task != EVALUATE:
        raise ValueError(f"unknown cross-evaluation task {task!r}; expected '{IDENTIFY}' or '{EVALUATE}'")
    site.load_global(msg)
    model_round = int(number(config, keys.SERVER_ROUND)) if keys.SERVER_ROUND in config else None
    if model_round is None:  # a checkpoint file the centre could not place in the run: nothing to pair it with
        log.warning(
            "cross-eval %s names no round: scored with this site's latest tensors of run %s, and neither "
            "the Dice nor a personalized copy is kept",
            config[keys.CROSS_EVAL_MODEL],
            site.run.name,
        )
    data = SiteData.open(site.cfg, site.state, msg)
    scored_ids = require_cohort(site.cfg, data.val_ids if trained else data.labelled_ids, "validation")
    scored = data.volumes(scored_ids)
    enough_tests = len(data.test_ids) >= site.cfg.site.min_cohort  # fewer: no test Dice leaves the site
    test = data.volumes(data.test_ids) if trained and enough_tests else []
    num_classes = data.spec.num_classes
    train = site.cfg.train
    own = evaluate(site.model, scored, data.cfg.data, train, num_classes)
    metrics = {
        "dice": own.dice,
        "trained": float(trained),
        keys.NUM_EXAMPLES: own.num_cases,
        **class_metrics(keys.DICE_CLASS_PREFIX, own.dice_per_class),
    }
    if test:
        scores = evaluate(site.model, test, data.cfg.data, train, num_classes)
        metrics |= {
            keys.TEST_DICE: scores.dice,
            keys.TEST_NUM_EXAMPLES: scores.num_cases,
            **class_metrics(keys.TEST_DICE_CLASS_PREFIX, scores.dice_per_class),
        }
    if trained and train.personalize_steps > 0:
        result = personalize(
            site.model, data.volumes(data.train_ids), scored, data.cfg.data, train, num_classes, train.seed
        )
        metrics["dice_personal"] = result.dice_after
        if test:
            metrics[keys.TEST_DICE_PERSONAL] = evaluate(site.model, test, data.cfg.data, train, num_classes).dice
        if model_round is not None:
            site.run.save_personalized(
                site.model.state_dict(),
                site.signature,
                model_round,
                {
                    "steps": result.steps,
                    "dice_before": result.dice_before,
                    "dice_after": result.dice_after,
                    "scope": train.personalize,
                    "validation_cases": scored_ids,
                    "plan_version": data.plan.version,
                },
            )
        log.info(
            "cross-eval %s: personalized for %d steps, validation Dice %.4f -> %.4f",
            config[keys.CROSS_EVAL_MODEL],
            result.steps,
            result.dice_before,
            result.dice_after,
        )
    if not trained and train.adapt_norm_steps > 0:
        images = [image for image, _ in scored]
        adapted = adapt_norm(
            site.model,
            images,
            data.cfg.data,
            train.adapt_norm_steps,
            train.batch_size,
            train.seed,
            compute_for(train).device,
        )
        metrics["dice_adapted"] = (
            evaluate(site.model, scored, data.cfg.data, train, num_classes).dice if adapted else own.dice
        )
        log.info(
            "cross-eval %s: BatchNorm statistics %s, Dice %.4f -> %.4f",
            config[keys.CROSS_EVAL_MODEL],
            "re-estimated" if adapted else "absent (nothing to adapt)",
            own.dice,
            metrics["dice_adapted"],
        )
    if trained and model_round is not None:
        site.run.record_score(
            model_round,
            cross_eval_dice=own.dice,
            dice_personal=metrics.get("dice_personal"),
            validation_cases=scored_ids,
        )
    return site.reply(msg, metrics)


def class_metrics(prefix: str, dice_per_class: list[float]) -> dict[str, float]:
    """One Dice per foreground class, named ``<prefix><class>`` (classes from 1)."""
    return {f"{prefix}{i + 1}": d for i, d in enumerate(dice_per_class)}
