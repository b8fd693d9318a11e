"""A real local Ray cluster and Serve application over the tiny models, started once per session.

Everything binds to 127.0.0.1 on free ports; teardown shuts Serve and Ray down.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest

SERVING_ARGS = {
    "served_model_name": "via-sd-tiny",
    "models": {
        "drafter": {"source": "tiny-random:drafter", "dtype": "float64", "quantization": "none"},
        "verifier": {"source": "tiny-random:verifier", "dtype": "float64"},
    },
    "slim": {"layers": [0, 1, 3]},
    "router": {"mode": "via-sd", "block_size": 4, "direct_threshold": 0.9, "slim_threshold": 0.5,
               "escalate_threshold": 0.6},
    "limits": {"max_tokens": 256, "default_max_tokens": 32},
    "threads": 1,
    # KV pools of 8 slots per tier replica: the soak's 16 clients queue for them
    "serving": {"kv_max_slots": 8,
                "deployments": {name: {"ray_actor_options": {"num_cpus": 0.1}}
                                for name in ("Ingress", "Router", "Drafter", "SlimVerifier", "FullVerifier")}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    http: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    metrics_port: int
    dashboard: str
    app_name: str = "via-sd"


@pytest.fixture(scope="session")
def cluster():
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    import ray
    from ray import serve

    from via_sd_ray.serving.app import build_app
    from via_sd_ray.serving.grpc_service import SERVICER_FUNCTIONS

    http_port, grpc_port, metrics_port, dash_port = (free_port() for _ in range(4))
    # address "local": a new cluster, never one another test's scenario started beside this one
    ray.init(address="local", num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dash_port,
             _metrics_export_port=metrics_port, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": list(SERVICER_FUNCTIONS)})
    serve.run(build_app(SERVING_ARGS), name="via-sd", route_prefix="/")
    try:
        yield Cluster(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", metrics_port,
                      f"http://127.0.0.1:{dash_port}")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def local_engine():
    """The in-process engine over the same config: the reference outputs."""
    from via_sd_ray.config import parse_config
    from via_sd_ray.models.local import LocalEngine

    return LocalEngine(parse_config(SERVING_ARGS))
