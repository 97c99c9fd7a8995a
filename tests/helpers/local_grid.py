"""A federation in one process: the real strategy talks to the real ClientApp through Flower's transport.

``LocalGrid`` is a Flower Grid whose ``send_and_receive`` hands each message
to ``client.client_app.app`` (the ClientApp a SuperNode runs) and returns its
reply, packed and unpacked on the way as the run's grid does
(server/packed_grid.py). Both directions go through Flower's wire
representation: every object of the message is deflated to bytes and the
message is re-inflated from those bytes, exactly what a SuperLink stores and
forwards. A ``tamper`` hook
may replace a site's reply (unpacked) after it left the site, which is how a
hostile hospital (one running modified code) is simulated.

It lets the hostile-site and DP tests run several federated rounds of the
real apps in seconds, without starting Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from common import keys
from common.config import FedsegConfig
from common.metrics_log import MetricsLog
from common.runs import SIM_SITES_DIR, run_dir, site_view
from server.checkpoints import Checkpoints
from server.packed_grid import packed, unpacked
from server.server_app import initial_weights
from server.strategy import FedSegStrategy
from simulations.runner import prepare_run, write_site_configs

Tamper = Callable[[int, Message], Message]
SERVER_NODE = 0
RUN_ID = 1


def over_the_wire(msg: Message) -> Message:
    """The message as the receiving side gets it: deflated to bytes, then inflated again."""
    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(msg).items()}
    inflated = inflate_object_from_contents(msg.object_id, contents)
    assert isinstance(inflated, Message)
    return inflated


def stamp(msg: Message) -> Message:
    """Give a message its id as a SuperLink does: its object id (Flower sets it the same way)."""
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


class InProcessGrid(Grid):
    """What a ServerApp's grid provides besides delivery, for grids that deliver in this process: the run, new
    messages, the node ids. Subclasses deliver (``push_messages``, ``pull_messages``, ``send_and_receive``)."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)
        self._run = Run.create_empty(run_id=RUN_ID)
        # What a ServerApp process has set before the strategy builds its first Message.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE, SERVER_NODE

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)


class LocalGrid(InProcessGrid):
    """Delivers messages to the ClientApp of node 1..N in this process."""

    def __init__(
        self,
        cfg: FedsegConfig,
        app: ClientApp | Callable[[Message, Context], Message] | None,
        tamper: Tamper | None = None,
    ) -> None:
        super().__init__(range(1, len(cfg.federation.sites) + 1))
        self.cfg = cfg
        self.app = app
        self.tamper = tamper
        self.received: list[Message] = []
        """Every reply as the server got it."""
        self._pending: dict[str, Message] = {}

    def context(self, node: int) -> Context:
        return Context(
            run_id=RUN_ID,
            node_id=node,
            node_config={keys.NODE_PARTITION_ID: node - 1},
            state=RecordDict(),
            run_config={
                keys.RUN_CONFIG_KEY: site_view(self.cfg).to_yaml(),
                keys.SIM_SITES_KEY: str(run_dir(self.cfg) / SIM_SITES_DIR),
            },
        )

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if self.app is None:
            raise RuntimeError("this grid was built without a ClientApp: it configures rounds, it delivers nothing")
        stamp(packed(msg))
        reply = unpacked(self.app(over_the_wire(msg), self.context(node)))
        if self.tamper is not None:
            reply = self.tamper(node, reply)
        reply = over_the_wire(stamp(reply))
        self.received.append(reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver at once; the replies wait under the message's object id until pulled."""
        ids = []
        for msg in messages:
            ids.append(msg.object_id)
            self._pending[msg.object_id] = self._deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._deliver(msg) for msg in messages]


def federation(cfg: FedsegConfig, datasets: dict[str, Path]) -> FedsegConfig:
    """Name the run, write one site.yaml per site (as fedseg-sim does) and return the resolved config."""
    sim = cfg.simulation.replace(num_sites=len(datasets))
    cfg = prepare_run(cfg.replace(simulation=sim))
    write_site_configs(cfg, datasets)
    return cfg


def model_strategy(cfg: FedsegConfig, run: Path) -> tuple[FedSegStrategy, dict]:
    """The real strategy for the run's real model, logging and checkpointing under ``run``, and the model's
    initial weights (name -> tensor) it starts from."""
    weights, signature = initial_weights(cfg)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    return FedSegStrategy(cfg, signature, shapes, MetricsLog(run), Checkpoints(run / "checkpoints")), weights
