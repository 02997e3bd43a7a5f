"""Helpers of the tests of ``lcmla serve`` on Ray Serve: its model replicas as the controller and the router see them,
and waiting for a condition."""

from __future__ import annotations

import time

import ray
from ray import serve

from lcmla_sdk.serve.routing import rendezvous_order


def replica_ids() -> list:
    from ray.serve._private.common import ReplicaID

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [ReplicaID.from_full_id_str(n) for n in names if n.startswith("SERVE_REPLICA::") and "#Generator#" in n]


def replica_states() -> dict[str, int]:
    """The controller's count of model replicas by state (``{"RUNNING": 2}`` when both serve and none is changing;
    a killed replica stays counted as running for a few seconds, while its replacement starts)."""
    deployment = serve.status().applications["lcmla"].deployments["Generator"]
    return {str(state).rsplit(".", 1)[-1]: count for state, count in deployment.replica_states.items() if count}


def preferred_replica(id_: str) -> str:
    """The replica the affinity router offers ``id_`` first (the router's own ordering over the live replicas)."""

    class Candidate:
        def __init__(self, replica_id) -> None:
            self.replica_id = replica_id

    return rendezvous_order(id_, [Candidate(r) for r in replica_ids()])[0].replica_id.to_full_id_str()


def ongoing_requests(replica: str) -> int:
    """The requests ``replica`` holds now (in a pass or waiting for one), as Ray Serve counts them."""
    return ray.get(ray.get_actor(replica, namespace="serve").get_num_ongoing_requests.remote(), timeout=30)


def wait_for(condition, failure, timeout_s: float = 60.0, poll_s: float = 0.05) -> None:
    """Poll ``condition()`` until true; past ``timeout_s`` fail with ``failure()`` (a message made when needed)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, failure()
        time.sleep(poll_s)
