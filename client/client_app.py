"""The ClientApp every site runs: FedProx training and evaluation with site-local norm layers.

Handlers are thin: resolve the site, load the merged model, call a common/
loop, reply with only the travelling arrays and numeric metrics. Any failure
is logged in full at the site and answered with a short, sanitized reason:
no traceback, no file paths, no case names.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from collections.abc import Callable

from flwr.app import Context, Error, Message, MetricRecord
from flwr.clientapp import ClientApp

from common import keys, threadsafe_monai  # noqa: F401  (threadsafe_monai: MONAI whole before any thread races for it)
from common import secagg as common_secagg
from common.config import FedsegConfig
from common.evaluation import evaluate as evaluate_model
from common.params import select
from common.preprocess import Volume
from common.records import number
from common.training import train_local
from common.wire import pack, to_wire

from . import egress, inbound, local_dp, secagg, site_history, timeline
from .cross_eval import class_metrics, cross_evaluate
from .reasons import PlainUpdateRefused, UnderSiteFloor, sanitized_reason
from .site import Site, log_to_site_file
from .site_data import SiteData, annotator_metrics, fingerprint_reply, require_cohort

log = logging.getLogger("fedseg.client")
SITE_ERROR_CODE = 1001


def _round_seed(cfg: FedsegConfig, server_round: int) -> int:
    return cfg.train.seed * 1_000_003 + server_round * 7919 + zlib.crc32(cfg.site.name.encode())


def _train(site: Site, msg: Message) -> Message:
    """Train on the received global model; first score it, when the server asks, for the previous round."""
    started = time.perf_counter()
    refuse_under_floors(site.cfg, masked=secagg.requested(msg))
    received = site.load_global(msg)
    config = msg.content[keys.CONFIG]
    server_round = int(number(config, keys.SERVER_ROUND))
    data = SiteData.open(site.cfg, site.state, msg)
    volumes = data.volumes(require_cohort(site.cfg, data.train_ids, "training"))
    timeline.mark(site.marks, timeline.DATA_READY)
    evaluation = None
    scoring = config.get(keys.EVALUATE_RECEIVED) is True
    if scoring and can_score(site, data.val_ids):
        evaluation = _evaluation(site, data, data.volumes(data.val_ids))
    result = train_local(
        site.model,
        volumes,
        data.cfg.data,
        site.cfg.train,
        global_params={k: received[k] for k in site.split.trainable_shared},
        mu=float(number(config, keys.PROXIMAL_MU)),
        seed=_round_seed(site.cfg, server_round),
    )
    site.run.save_norm(server_round, select(site.model, site.split.local), site.signature)
    travelling = local_dp.privatize(
        site.cfg.site,
        site.run,
        server_round,
        received,  # site.yaml's own DP
        select(site.model, site.split.travelling),
    )
    arrays = to_wire(travelling, str(config[keys.WIRE_DTYPE]))
    metrics = {
        "loss": result.loss,
        "proximal_loss": result.proximal_loss,
        "duration_s": time.perf_counter() - started,
        keys.NUM_EXAMPLES: len(data.train_ids),
        keys.LEARNING_RATE: result.lr,
    }
    if scoring and evaluation is None:
        metrics[keys.NO_SCORE] = 1
    if secagg.requested(msg):  # SecAgg+: only the masked update leaves, and no case count (every site weighs 1)
        arrays = secagg.masked_update(site, msg, travelling, received)
        del metrics[keys.NUM_EXAMPLES]
    log.info("round %d: trained %d steps, loss %.4f", server_round, result.steps, result.loss)
    reply = site.reply(msg, metrics, arrays)
    if evaluation is not None:
        reply.content[keys.EVALUATION] = MetricRecord(dict(evaluation))
    return reply


def refuse_under_floors(cfg: FedsegConfig, masked: bool) -> None:
    """The site's own floors under what an update is computed from and how it leaves; the centre cannot lower them."""
    t, floors = cfg.train, cfg.site
    if floors.require_secure_aggregation and not masked:
        raise PlainUpdateRefused("the centre asks for a plain update; site.require_secure_aggregation is true")
    if t.local_steps < floors.min_local_steps or t.batch_size < floors.min_batch_size:
        raise UnderSiteFloor(
            f"train.local_steps {t.local_steps} / batch_size {t.batch_size} under this site's "
            f"site.min_local_steps {floors.min_local_steps} / min_batch_size {floors.min_batch_size}"
        )


def can_score(site: Site, val_ids: list[str]) -> bool:
    """Whether this site's validation cases reach its cohort floor; below it, it trains and sends no score.

    The floor guards what is computed from the cases (a Dice over two patients
    describes those two), so it refuses the score, never the training: a
    hospital of 10 cases trains in every round. The site says so once per run.
    """
    if len(val_ids) >= site.cfg.site.min_cohort:
        return True
    if site.state.info().get("no_score_run") != site.cfg.federation.run_id:
        site.state.update_info(no_score_run=site.cfg.federation.run_id)
        log.warning(
            "site %s: %d validation case(s), fewer than site.min_cohort = %d: it trains in every round "
            "but sends no validation score",
            site.cfg.site.name,
            len(val_ids),
            site.cfg.site.min_cohort,
        )
    return False


def _evaluation(site: Site, data: SiteData, volumes: list[Volume]) -> dict[str, float]:
    """Validation metrics of the model as loaded: the global model with this site's own norm tensors."""
    result = evaluate_model(site.model, volumes, data.cfg.data, site.cfg.train, data.spec.num_classes)
    metrics = {"dice": result.dice, "loss": result.loss, keys.NUM_EXAMPLES: result.num_cases}
    metrics |= class_metrics(keys.DICE_CLASS_PREFIX, result.dice_per_class)
    if result.hd95 is not None:
        metrics["hd95"] = result.hd95
    return metrics | annotator_metrics(result)


def _evaluate(site: Site, msg: Message) -> Message:
    site.load_global(msg)
    data = SiteData.open(site.cfg, site.state, msg)
    volumes = data.volumes(require_cohort(site.cfg, data.val_ids, "validation"))
    timeline.mark(site.marks, timeline.DATA_READY)
    return site.reply(msg, _evaluation(site, data, volumes))


def _handle(handler: Callable[[Site, Message], Message], msg: Message, context: Context) -> Message:
    """Every message enters through the site's receiving boundary (client/inbound.py) and every reply, error or
    not, leaves through the egress guard (client/egress.py)."""
    site_name, site, marks = "unknown", None, timeline.start(msg)
    log_to_site_file(None)
    try:
        inbound.received(msg)  # unpacked and checked before anything else reads it
        site = Site.resolve(context, msg)
        site.marks = marks | timeline.pulled_at(site.state.root, msg)
        site_name = site.cfg.site.name
        reply = handler(site, msg)
    except Exception as err:  # every failure becomes a sanitized error reply
        if site is None:  # refused before the site was resolved: it still names itself, logs and audits the refusal
            with contextlib.suppress(Exception):
                site = Site.resolve(context)
                site_name = site.cfg.site.name
        log.exception("site %s failed to handle a %s message", site_name, msg.metadata.message_type)
        reply = Message(Error(code=SITE_ERROR_CODE, reason=sanitized_reason(site_name, err)), reply_to=msg)
    reply = egress.guard(reply, msg, site)  # never raises: a failure there leaves as a fixed reason
    if site is not None and not reply.has_error():  # the site's history counts only what really left
        try:
            site_history.record_reply(site.state.root, msg, reply)
        except Exception:  # the reply left (egress.jsonl says so); only the site's own bookkeeping is short
            log.exception("site %s: a reply left, but the site's history could not record it", site_name)
        reply.content = pack(reply.content)  # after the guard: packing only regroups what it let out
    return reply


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(_train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(_evaluate, msg, context)


@app.query(keys.FINGERPRINT_ACTION)
def fingerprint(msg: Message, context: Context) -> Message:
    """Aggregate statistics of this site's data for the federation's plan (server/planning.py)."""
    return _handle(fingerprint_reply, msg, context)


@app.query(common_secagg.KEYS_ACTION)
def secagg_keys(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 1: this round's public keys (client/secagg.py)."""
    return _handle(secagg.public_keys, msg, context)


@app.query(common_secagg.SHARES_ACTION)
def secagg_shares(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 2: this site's secrets, shared among the round's sites and encrypted for each."""
    return _handle(secagg.encrypted_shares, msg, context)


@app.query(common_secagg.UNMASK_ACTION)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 4: the shares that remove the masks of the round's survivors and dropped sites."""
    return _handle(secagg.unmask_shares, msg, context)


@app.query(keys.CROSS_EVAL_ACTION)
def cross_eval(msg: Message, context: Context) -> Message:
    """Score a global checkpoint with this site's own norm tensors (server/cross_eval.py)."""
    return _handle(cross_evaluate, msg, context)
