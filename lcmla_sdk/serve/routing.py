"""A Ray Serve request router that keeps an identity's K/V cache where it is used.

A request that carries an ``affinity`` key (the identity id of a ``kv_cache`` request) is offered first to the
replica that rendezvous hashing assigns that key among the live replicas, then to the others; Ray Serve's router
moves on to the next rank when a replica has no room (its ``max_ongoing_requests`` are taken). Every router
instance (one per ingress replica) computes the same assignment without sharing state, and a replica that dies
moves only its own keys. Requests without a key go to the less loaded of two random replicas, as Ray's default.

Unlike ``serve.multiplexed``, the key is not the request's model id, so ``@serve.batch`` still merges the requests
of different identities into one batch.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def affinity_key(request: PendingRequest | None) -> str | None:
    if request is None or not request.args:
        return None
    return getattr(request.args[0], "affinity", None)


def rendezvous_order(key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """``replicas`` from the one ``key`` belongs to down (highest hash of key and replica id first)."""

    def weight(replica: RunningReplica) -> bytes:
        return hashlib.sha256(f"{key}|{replica.replica_id.unique_id}".encode()).digest()

    return sorted(replicas, key=weight, reverse=True)


class IdentityAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = affinity_key(pending_request)
        if not candidate_replicas:
            return []
        if pending_request is not None:  # every replica is offered at once: wait between tries when all are full
            pending_request.routing_context.should_backoff = True
        if key is not None:
            first, *rest = rendezvous_order(key, candidate_replicas)
            return [[first], random.sample(rest, min(2, len(rest)))] if rest else [[first]]
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
