"""The application builder: ``import_path: via_sd_ray.serving.app:build_app``.

One function turns the validated application args into five deployments: ``Ingress``
(HTTP + gRPC), ``Router`` (the block loop) and the tiers ``Drafter``, ``SlimVerifier``,
``FullVerifier``; four where the router sends the slim tier no block (``serving.slim_tier``).
Their Serve options (replicas, autoscaling, resources, queue limits) come from
``serving.deployments`` in the same args, never from decorator literals.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from via_sd_ray.config import EngineConfig, load_config, parse_config
from via_sd_ray.serving.ingress import Ingress
from via_sd_ray.serving.router import GenerationRouter
from via_sd_ray.serving.tiers import DEPLOYMENT_OF_TIER, TierServer

GRPC_SERVICER = "via_sd_ray.serving.grpc_service.add_ViaSDServicer_to_server"
# Consistent hashing on the handle's session_id, which the router sets to the generation id.
AFFINITY_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


def deployment_options(config: EngineConfig, name: str) -> dict[str, Any]:
    options = config.serving.deployments[name].serve_options()
    if name in DEPLOYMENT_OF_TIER.values() and config.serving.affinity:
        options["request_router_config"] = RequestRouterConfig(request_router_class=AFFINITY_ROUTER)
    return options


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Build the VIA-SD application from its args (``applications[].args`` of the Serve config)."""
    config = parse_config(args)  # fail fast, in the process that runs `serve run`, with the field named
    # replicas get the resolved config (profile merged in), so they need no file next to them
    args = {**config.model_dump(mode="json"), "profile": None}
    tiers = {"slim": None}  # no SlimVerifier where the router sends it no block (serving.slim_tier)
    for tier, name in DEPLOYMENT_OF_TIER.items():
        if tier == "slim" and not config.slim_deployed():
            continue
        deployment = serve.deployment(TierServer, name=name).options(**deployment_options(config, name))
        tiers[tier] = deployment.bind(args, tier)
    router = serve.deployment(GenerationRouter, name="Router").options(**deployment_options(config, "Router"))
    router_app = router.bind(args, tiers["drafter"], tiers["slim"], tiers["full"])
    ingress = serve.deployment(Ingress, name="Ingress")
    return ingress.options(**deployment_options(config, "Ingress")).bind(args, router_app)


def build_app_from_file(path: str, app_name: str | None = None) -> serve.Application:
    """``build_app`` for the args of a Serve config file (tests and scripts)."""
    config = load_config(path, app_name)
    return build_app(config.model_dump(mode="json", exclude_none=True))
