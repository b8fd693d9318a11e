"""A tier that is slow to load, for readiness tests: its start waits until a file exists.

``gated_app`` is ``serving.app.build_app`` with the ``FullVerifier`` deployment replaced by a
``GatedTierServer``; the replicas import this module (Ray puts the test run's working directory
on their path).
"""

from __future__ import annotations

import os
import time

from ray import serve

from via_sd_ray.config import parse_config
from via_sd_ray.serving.app import deployment_options
from via_sd_ray.serving.ingress import Ingress
from via_sd_ray.serving.router import GenerationRouter
from via_sd_ray.serving.tiers import DEPLOYMENT_OF_TIER, TierServer

GATE_LIMIT_S = 300.0  # a gate never opened (a test that died) still lets the replica start


class GatedTierServer(TierServer):
    """A ``TierServer`` whose model "loads" until ``gate`` exists, then loads and warms up as usual."""

    def __init__(self, args, tier: str, gate: str):
        deadline = time.monotonic() + GATE_LIMIT_S
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.1)
        super().__init__(args, tier)


def gated_app(args: dict, gate: str) -> serve.Application:
    """The application of ``build_app(args)``, its full verifier waiting for ``gate``."""
    config = parse_config(args)
    args = {**config.model_dump(mode="json"), "profile": None}
    tiers = {}
    for tier, name in DEPLOYMENT_OF_TIER.items():
        gated = tier == "full"
        deployment = serve.deployment(GatedTierServer if gated else TierServer, name=name)
        extra = (gate,) if gated else ()
        tiers[tier] = deployment.options(**deployment_options(config, name)).bind(args, tier, *extra)
    router = serve.deployment(GenerationRouter, name="Router").options(**deployment_options(config, "Router"))
    router_app = router.bind(args, tiers["drafter"], tiers["slim"], tiers["full"])
    ingress = serve.deployment(Ingress, name="Ingress")
    return ingress.options(**deployment_options(config, "Ingress")).bind(args, router_app)
