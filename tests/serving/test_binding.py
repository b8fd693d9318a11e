"""Where the servers listen: HTTP on loopback by default; gRPC wherever Ray Serve 2.60 puts it.

Serve's gRPC proxy binds ``[::]:<port>`` (every interface) and has no host option, so on a machine
with other interfaces the gRPC port is reachable from them: firewall it, or rely on the Kubernetes
Services (ClusterIP) in front of it. ``docs/security.md`` says so; the last test here notices when
a Serve upgrade changes it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def test_shipped_cpu_config_binds_http_to_loopback():
    config = yaml.safe_load((ROOT / "deployments" / "via_sd.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"


@pytest.mark.skipif("RAY_SERVE_DEFAULT_HTTP_HOST" in os.environ, reason="the environment overrides Serve's default")
def test_configs_without_a_host_get_serves_loopback_default():
    from ray.serve.config import HTTPOptions

    tiny = yaml.safe_load((ROOT / "deployments" / "via_sd.tiny.yaml").read_text())
    assert "host" not in (tiny.get("http_options") or {})
    assert HTTPOptions().host in LOOPBACK


def outside_address() -> str:
    """An address of this machine that is not loopback (the interface of the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only, nothing is sent
        except OSError:
            pytest.skip("no network interface besides loopback")
        address = s.getsockname()[0]
    if address.startswith("127.") or address == "0.0.0.0":
        pytest.skip("no network interface besides loopback")
    return address


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_http_is_not_reachable_from_outside_loopback(cluster):
    port = int(cluster.http.rsplit(":", 1)[1])
    assert reachable("127.0.0.1", port)
    assert not reachable(outside_address(), port)


def test_serve_binds_grpc_on_every_interface(cluster):
    port = int(cluster.grpc.rsplit(":", 1)[1])
    assert reachable(outside_address(), port), "Serve's gRPC proxy now binds loopback: update docs/security.md"
