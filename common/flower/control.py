"""The launcher's side of the SuperLink's Control API (Flower 1.42 internals), reached over TLS on loopback only.

Registering a node is how Flower 1.42 turns SuperNode authentication into an
allow-list: with ``--enable-supernode-auth`` a SuperNode can only activate
under a public key the Control API registered. The launcher makes the
registered set equal to the allow-list at every start (adding missing sites,
unregistering keys that are no longer listed), and asks which sites are online
to show progress (server/launcher.py). Flower's Control client is internal
API; it is used here and nowhere else. (The run is submitted here too, rather
than with ``flwr run``, so the bundle whose SHA-256 the launcher prints is byte
for byte the one sent.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from .constants import NodeStatus, Status

CONTROL_HOST = "127.0.0.1"
COMPONENT = "flwr CLI"
"""The component name Flower's CLI presents; the SuperLink checks version compatibility by it."""


@dataclass(frozen=True)
class Registration:
    added: list[str]
    removed: list[int]


@dataclass(frozen=True)
class RunState:
    status: str
    sub_status: str
    details: str

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED


class ControlAPI:
    """Register the allow-listed sites, submit the run, and watch sites and run."""

    def __init__(self, port: int, ca_file: Path) -> None:
        self.client = ControlHttpClient.from_server_address(
            f"{CONTROL_HOST}:{port}",
            insecure=False,
            root_certificates=Path(ca_file).read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name=COMPONENT)],
        )

    def close(self) -> None:
        self.client.close()

    def _nodes(self) -> list:
        return [n for n in self.client.ListNodes(ListNodesRequest()).nodes_info if n.status != NodeStatus.UNREGISTERED]

    def sync_allow_list(self, keys: dict[str, ec.EllipticCurvePublicKey]) -> Registration:
        """Make the registered node keys exactly the allow-listed ones."""
        wanted = {public_key_to_bytes(key): site for site, key in keys.items()}
        nodes = self._nodes()
        present = {bytes(n.public_key) for n in nodes}
        removed = [n.node_id for n in nodes if bytes(n.public_key) not in wanted]
        for node_id in removed:
            self.client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
        added = []
        for pem, site in wanted.items():
            if pem not in present:
                self.client.RegisterNode(RegisterNodeRequest(public_key=pem, name=site))
                added.append(site)
        return Registration(added, removed)

    def node_names(self) -> dict[int, str]:
        return {n.node_id: n.name for n in self._nodes() if n.name}

    def online_sites(self) -> list[str]:
        return sorted(n.name or str(n.node_id) for n in self._nodes() if n.status == NodeStatus.ONLINE)

    def start_run(self, fab: bytes, run_config: dict[str, str]) -> int:
        """Submit the app bundle with its run config; returns Flower's run id."""
        override: dict[str, bool | float | int | str] = dict(run_config)
        request = StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
            override_config=user_config_to_proto(override),
        )
        response = self.client.StartRun(request)
        if not response.HasField("run_id"):
            raise RuntimeError("the SuperLink did not start the run")
        return response.run_id

    def run_state(self, run_id: int) -> RunState:
        run = self.client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        return RunState(run.status.status, run.status.sub_status, run.status.details)

    def stop_run(self, run_id: int) -> None:
        self.client.StopRun(StopRunRequest(run_id=run_id))
