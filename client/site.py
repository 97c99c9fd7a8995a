"""The site one ClientApp message is handled for: its config, private state, model and its own log file.

Defined here, apart from the handlers (client/client_app.py, client/cross_eval.py,
client/site_data.py) and the egress guard (client/egress.py) that all take it,
so that each of them imports it from one place and none imports another.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from common import keys
from common.config import FedsegConfig, SiteFile, from_yaml_text, load_config, with_channels
from common.dataset import read_dataset
from common.device import with_site_compute
from common.params import ParameterSplit, load_merged, run_model
from common.plan import Plan
from common.runs import SITE_LOG, simulated_site_config, site_view
from common.wire import from_wire, message_round

from . import timeline
from .reasons import SignatureMismatch
from .site_state import RunState, SiteState

log = logging.getLogger("fedseg.client")
LOGGER_ROOT = "fedseg"
"""Every module logs to ``fedseg.<package>`` (fedseg.client, fedseg.common, fedseg.server, fedseg.sim), so one
handler on ``fedseg`` gets all of a site's records."""


@dataclasses.dataclass
class Site:
    """Everything one handler call needs about this site and this run."""

    cfg: FedsegConfig
    state: SiteState
    model: torch.nn.Module
    split: ParameterSplit
    signature: str
    marks: dict[str, float] = dataclasses.field(default_factory=dict)
    """This message's timeline at the site (client/timeline.py); sent with the reply's metrics."""

    @classmethod
    def resolve(cls, context: Context, msg: Message | None = None) -> Site:
        """Federation settings come from the run config, identity and paths from site.yaml.

        Whatever the run config holds, the site takes only ``site_view`` of it,
        in the simulation as in a deployment: the same fields, the same defaults.

        A deployed SuperNode names its site.yaml in its node config; in the
        simulation, the launcher wrote one site.yaml per partition into the run
        directory. The model's channels and classes, when the centre leaves
        them to the data, come from the plan ``msg`` carries (``with_model_channels``).
        """
        view = site_view(from_yaml_text(str(context.run_config[keys.RUN_CONFIG_KEY]), "run config"))
        if keys.NODE_SITE_CONFIG in context.node_config:
            site_yaml = Path(str(context.node_config[keys.NODE_SITE_CONFIG]))
        else:
            site_yaml = simulated_site_config(
                Path(str(context.run_config[keys.SIM_SITES_KEY])), int(context.node_config[keys.NODE_PARTITION_ID])
            )
        local = load_config(site_yaml, schema=SiteFile)
        cfg = view.resolved(local.site, with_site_compute(view.train, local.train))
        cfg = with_model_channels(cfg, msg)
        state = SiteState(Path(cfg.site.state_dir))
        log_to_site_file(state.root)
        torch.set_num_threads(cfg.site.torch_threads)
        return cls(cfg, state, *run_model(cfg))

    @property
    def run(self) -> RunState:
        """This site's state of the run the message belongs to (client/site_state.py)."""
        return self.state.run(self.cfg)

    def load_global(self, msg: Message) -> dict[str, torch.Tensor]:
        """Load the received shared tensors plus this site's own tensors of the same round into the model.

        A training message of round r carries global round r - 1's weights; an
        evaluation or cross-evaluation message names the round of the weights it
        carries. Each goes with the tensors this site held after that round, in
        this run only: a site that has none (its first round in the run) starts
        from the global initialisation, whatever other runs it trained in.
        """
        config = msg.content[keys.CONFIG]
        expected = str(config[keys.SIGNATURE])
        if expected != self.signature:
            raise SignatureMismatch(f"server signature {expected}, site signature {self.signature}")
        received = from_wire(msg.content.array_records[keys.ARRAYS])
        server_round = message_round(msg)
        model_round = (
            None if server_round is None else int(server_round) - int(msg.metadata.message_type == MessageType.TRAIN)
        )
        run = self.run
        own = run.norm_for(model_round, self.signature)
        if own is None and not run.trained:
            own = self.starting_tensors(run)
        load_merged(self.model, self.split, received, None if own is None else own[1])
        return received

    def starting_tensors(self, run: RunState) -> tuple[int, dict[str, torch.Tensor]] | None:
        """What a run this site has not trained in yet starts from: the global initialisation (None), or the last
        tensors of the run ``site.norm_from_run`` names, for the same model; either way the site says which."""
        source = self.cfg.site.norm_from_run
        if not source:
            log.info(
                "run %s: this site has no norm tensors of its own in this run yet; its norm layers start from "
                "the global initialisation",
                run.name,
            )
            return None
        start = self.state.run_folder(source).norm_for(None, self.signature)
        if start is None:
            raise ValueError(
                f"site.norm_from_run {source!r}: {self.state.run_folder(source).folder} holds no norm "
                "tensors; name a run this site trained in, or leave the option empty."
            )
        log.info(
            "run %s: this site's norm layers start from run %s, round %d (site.norm_from_run)",
            run.name,
            source,
            start[0],
        )
        if "started_from" not in run.info():
            run.record(started_from={"run": source, "round": start[0]})
        return start

    def reply(self, msg: Message, metrics: dict[str, float], arrays: ArrayRecord | None = None) -> Message:
        timeline.mark(self.marks, timeline.WORK_DONE)
        content = RecordDict(
            {
                keys.METRICS: MetricRecord({**metrics, **self.marks}),
                keys.IDENTITY: ConfigRecord({keys.SITE: self.cfg.site.name, keys.SIGNATURE: self.signature}),
            }
        )
        if arrays is not None:
            content[keys.ARRAYS] = arrays
        return Message(content=content, reply_to=msg)


def with_model_channels(cfg: FedsegConfig, msg: Message | None) -> FedsegConfig:
    """``cfg`` with the model's channels and classes, when the centre left them to the sites' data (0).

    The federation's plan (sent with every message after planning) holds the
    agreed labels and one normalization per channel; before it, as when the
    centre asks for the fingerprint, the site's own dataset.json decides.
    """
    if cfg.model.in_channels and cfg.model.out_channels:
        return cfg
    plan = received_plan(msg)
    if plan is not None and plan.label_codes:
        return cfg.replace(
            model=with_channels(cfg.model, len(plan.normalization), len(plan.label_codes), "the federation's plan")
        )
    spec = read_dataset(cfg.site.data_dir)
    return cfg.replace(
        model=with_channels(cfg.model, spec.num_channels, spec.num_classes, f"this site's dataset.json ({spec.labels})")
    )


def received_plan(msg: Message | None) -> Plan | None:
    """The plan a message from the centre carries, or None (a fingerprint query, a site working alone)."""
    config = msg.content.config_records.get(keys.CONFIG) if msg is not None and msg.has_content() else None
    if config is None or keys.PLAN not in config:
        return None
    return Plan.from_json(str(config[keys.PLAN]), "the plan sent by the server")


_serving: contextvars.ContextVar[Path | None] = contextvars.ContextVar("fedseg_serving_site", default=None)
"""The state folder of the site whose message this process is handling now.

One process can serve several sites (a Ray actor in the simulation); each
site.log must get only its own site's records, never another site's tracebacks.
"""
_site_log_handlers: dict[Path, logging.Handler] = {}


class _OnlyThisSite(logging.Filter):
    def __init__(self, state_root: Path) -> None:
        super().__init__()
        self.state_root = state_root

    def filter(self, record: logging.LogRecord) -> bool:
        return _serving.get() == self.state_root


def log_to_site_file(state_root: Path | None) -> None:
    """Full details of every failure stay at the site, in <state_dir>/site.log; None: no site's log (yet)."""
    _serving.set(state_root)
    if state_root is not None and state_root not in _site_log_handlers:
        handler = logging.FileHandler(state_root / SITE_LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_OnlyThisSite(state_root))
        ours = logging.getLogger(LOGGER_ROOT)  # every fedseg.* logger, common/ code run for this site included
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        _site_log_handlers[state_root] = handler
