"""Autoscaling of a tier on its own load.

Ongoing requests say little about a tier: one verify call of a block of 12 tokens costs
several times a draft call, a replica batches many calls into one forward pass, and
low-confidence traffic sends every block to the full verifier while the drafter's calls
stay short (drafting stops at the first unsure token). What limits a tier is the time
its model spends in forward passes, so each tier replica reports (``TierServer.
record_autoscaling_stats``) its ``busy_fraction`` and its ``queued_calls``, and this
policy sizes the tier so that the replicas' summed busy time fits under a target share
of each one:

    desired = max(sum(busy_fraction) / target_busy_fraction,
                  sum(queued_calls) / target_queued_calls)      # the second only when set

A busy fraction saturates at 1.0, so a saturated tier still grows by 1 / target per
decision. Serve applies ``min_replicas`` / ``max_replicas``, the up/downscale delays and
the scaling factors of the deployment's ``autoscaling_config`` around this (custom
policies get them too). Targets are per tier, in the YAML:

    FullVerifier:
      autoscaling_config:
        min_replicas: 1
        max_replicas: 4
        upscale_delay_s: 10
        downscale_delay_s: 60
        policy:
          policy_function: via_sd_ray.serving.autoscaling:TierLoadPolicy
          policy_kwargs: {target_busy_fraction: 0.6}
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger("ray.serve")

POLICY_PATH = "via_sd_ray.serving.autoscaling:TierLoadPolicy"


class TierLoadPolicy:
    """A Serve deployment-level autoscaling policy (``autoscaling_config.policy``) over tier load."""

    def __init__(self, target_busy_fraction: float = 0.6, target_queued_calls: float | None = None):
        if not 0 < target_busy_fraction <= 1:
            raise ValueError(f"target_busy_fraction: expected a value in (0, 1], received {target_busy_fraction}")
        if target_queued_calls is not None and target_queued_calls <= 0:
            raise ValueError(f"target_queued_calls: expected a value > 0, received {target_queued_calls}")
        self.target_busy_fraction = target_busy_fraction
        self.target_queued_calls = target_queued_calls

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        busy = metrics.get("busy_fraction") or {}
        if not busy:  # no replica has reported yet: keep what Serve has decided so far
            return ctx.target_num_replicas, ctx.policy_state
        load = sum(busy.values())
        desired = load / self.target_busy_fraction
        queued = sum((metrics.get("queued_calls") or {}).values())
        if self.target_queued_calls:
            desired = max(desired, queued / self.target_queued_calls)
        low = getattr(ctx, "capacity_adjusted_min_replicas", 0)
        high = getattr(ctx, "capacity_adjusted_max_replicas", math.inf)
        if min(max(math.ceil(desired), low), high) != ctx.current_num_replicas:  # log decisions, not steady state
            logger.info(f"TierLoadPolicy {getattr(ctx, 'deployment_name', '')}: busy {load:.2f} replicas, "
                        f"{queued:.0f} queued calls over {len(busy)} reports -> {desired:.2f} replicas "
                        f"(running {ctx.current_num_replicas})")
        return desired, {"busy_replicas": load, "queued_calls": queued}
