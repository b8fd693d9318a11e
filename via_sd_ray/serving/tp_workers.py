"""The tensor-parallel workers of a verifier tier replica, as Ray actors in the replica's placement group.

A ``SlimVerifier`` or ``FullVerifier`` replica with ``models.verifier.tensor_parallel_size`` = tp
is deployed with tp ``placement_group_bundles``: Serve puts the replica (rank 0) in bundle 0,
and ``RayShardLauncher`` starts ranks 1..tp-1 as actors in bundles 1..tp-1, each taking its
bundle's resources (a GPU each on a GPU node). The actors are the replica's children: when the
replica stops, they go with it. A worker that dies fails the next pass or health check with
``ShardFailure``; Serve then replaces the whole replica, workers included, and the router's
retries carry the calls over (the new replica rebuilds the KV caches from token ids).
"""

from __future__ import annotations

import dataclasses

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from via_sd_ray.config import EngineConfig
from via_sd_ray.errors import ConfigError
from via_sd_ray.models.sharded import ShardCall, ShardFailure, ShardSpec, ShardWorker


def accelerator_ids() -> list | None:
    """The GPU ids Ray assigned this process (empty: none), or None outside a Ray worker."""
    if not ray.is_initialized():
        return None
    try:
        return list(ray.get_gpu_ids())
    except Exception:  # a driver, not a worker
        return None


def gpu_share() -> float | None:
    """The fraction of a GPU Ray gave this process (``num_gpus: 0.25``), or None: a whole GPU, none, or no Ray."""
    if not ray.is_initialized():
        return None
    try:
        gpus = ray.get_runtime_context().get_assigned_resources().get("GPU")
    except Exception:  # a driver, not a worker
        return None
    return gpus if gpus is not None and 0 < gpus < 1 else None


VERIFIER_DEPLOYMENTS = {"slim": "SlimVerifier", "full": "FullVerifier"}
PING_TIMEOUT_S = 5.0  # a ping not back by then is a worker busy with a pass, not a dead one


@ray.remote(max_restarts=0)
class _ShardActor:
    """Rank ``rank`` of a group: builds its shard (joining the group), then runs rank 0's calls in order."""

    def __init__(self, spec: ShardSpec, rank: int):
        from via_sd_ray.models.tiers import build_shard, placed_model

        spec = dataclasses.replace(spec, model=placed_model(spec.model, accelerator_ids()))
        self.worker = ShardWorker(build_shard(spec, rank))

    def ready(self) -> bool:
        return True

    def run(self, call: ShardCall) -> None:
        self.worker.run(call)


class RayShardPeers:
    """Rank 0's handle on its worker actors (``models.sharded.ShardPeers``)."""

    def __init__(self, actors: list, timeout_s: float):
        self.actors = actors
        self.timeout_s = timeout_s
        self._pings: list | None = None  # the health check's pings still out

    def ready(self) -> None:
        self._get([actor.ready.remote() for actor in self.actors], "start")

    def submit(self, call: ShardCall) -> list:
        ref = ray.put(call)
        return [actor.run.remote(ref) for actor in self.actors]

    def wait(self, pending: list) -> None:
        self._get(pending, "run a forward pass")

    def check(self) -> None:
        if self._pings is None:
            self._pings = [actor.ready.remote() for actor in self.actors]
        done, _ = ray.wait(self._pings, num_returns=len(self._pings), timeout=PING_TIMEOUT_S)
        if len(done) == len(self._pings):
            pings, self._pings = self._pings, None
            self._get(pings, "answer a health check")
        else:  # busy: a dead actor's ping would have failed at once
            self._get(done, "answer a health check")

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)

    def _get(self, refs: list, what: str) -> None:
        try:
            ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError:
            raise ShardFailure(f"a tensor-parallel worker did not {what} within {self.timeout_s} s") from None
        except RayError as err:
            raise ShardFailure(f"a tensor-parallel worker failed to {what}: {err}") from err


class RayShardLauncher:
    """Starts a tier's tensor-parallel ranks 1..tp-1 in bundles 1..tp-1 of ``placement_group`` (default: the
    placement group of the calling replica)."""

    def __init__(self, deployment: str, placement_group: PlacementGroup | None = None):
        self.deployment = deployment
        self.placement_group = placement_group

    def address(self) -> str:
        return ray.util.get_node_ip_address()

    def start(self, spec: ShardSpec) -> RayShardPeers:
        world = spec.rendezvous.world_size
        group = self.placement_group or get_current_placement_group()
        bundles = group.bundle_specs if group is not None else []
        if len(bundles) < world:
            raise ConfigError(f"serving.deployments.{self.deployment}.placement_group_bundles: expected {world} "
                              f"bundles (one per tensor-parallel rank; the first is the replica's), received "
                              f"{len(bundles)}")
        actors = []
        for rank in range(1, world):
            bundle = dict(bundles[rank])
            actors.append(_ShardActor.options(
                num_cpus=bundle.pop("CPU", 0), num_gpus=bundle.pop("GPU", 0), memory=bundle.pop("memory", None),
                resources=bundle or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            ).remote(spec, rank))
        return RayShardPeers(actors, spec.rendezvous.timeout_s)


def shard_launcher(config: EngineConfig, tier: str) -> RayShardLauncher | None:
    """The launcher of ``tier``'s tensor-parallel workers, if it has any."""
    if tier in VERIFIER_DEPLOYMENTS and config.models.verifier.tensor_parallel_size > 1:
        return RayShardLauncher(VERIFIER_DEPLOYMENTS[tier])
    return None
