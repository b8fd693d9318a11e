"""A multi-node local Ray cluster serving the tiny config, one raylet per tier, with per-tier
autoscaling on tier load (``via_sd_ray.serving.autoscaling.TierLoadPolicy``).

Run by ``test_autoscaling.py`` in a subprocess (the other serving tests hold a one-node cluster
for the session): ``python -m tests.serving.multinode_scenario OUT.json``. It

1. starts a head (Ingress, Router) and three worker raylets with the custom resources
   ``tier-drafter``, ``tier-slim``, ``tier-full`` that the tier deployments ask for;
2. records on which node every replica landed;
3. sends a bounded burst of low-confidence traffic (every block below the slim threshold, so
   every block goes to the full verifier), printing the replica counts over time, until
   ``FullVerifier`` has scaled up (or a time bound);
4. stops the load and waits (bounded) for the tiers to settle back to one replica;

and writes what it saw as JSON. Metric push intervals are shortened (the default is 10 s).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

TIERS = ("Drafter", "SlimVerifier", "FullVerifier")
RESOURCE = {"Drafter": "tier-drafter", "SlimVerifier": "tier-slim", "FullVerifier": "tier-full"}
AUTOSCALING = {
    "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
    "upscale_delay_s": 2, "downscale_delay_s": 6, "look_back_period_s": 3,
    # Serve 2.60 replicas push their metrics every metrics_interval_s (default 10 s; the env var the
    # field's deprecation names is read by handles only)
    "metrics_interval_s": 0.5,
    "policy": {"policy_function": "via_sd_ray.serving.autoscaling:TierLoadPolicy",
               "policy_kwargs": {"target_busy_fraction": 0.5}},
}
ARGS = {
    "served_model_name": "via-sd-tiny",
    "models": {
        "drafter": {"source": "tiny-random:drafter", "dtype": "float32", "quantization": "none"},
        # ~10x the drafter's compute per token, as with real pairs
        "verifier": {"source": "tiny-random:verifier-wide", "dtype": "float32"},
    },
    "slim": {"layers": [0, 1, 3]},
    "router": {"mode": "via-sd", "block_size": 4, "draft_stop_threshold": 0.9, "direct_threshold": 0.9,
               "slim_threshold": 0.5, "escalate_threshold": 0.6},
    "limits": {"max_tokens": 256, "default_max_tokens": 32},
    "threads": 1,
    "serving": {"deployments": {
        "Ingress": {"ray_actor_options": {"num_cpus": 0, "resources": {"frontend": 1}}},
        "Router": {"ray_actor_options": {"num_cpus": 0, "resources": {"frontend": 1}}},
        **{name: {"ray_actor_options": {"num_cpus": 0, "resources": {RESOURCE[name]: 1}},
                  "autoscaling_config": AUTOSCALING} for name in TIERS},
    }},
}
# every block's confidence is below 1.0: all of them go to the full verifier
LOW_CONFIDENCE = {"mode": "via-sd", "direct_threshold": 1.0, "slim_threshold": 1.0}
PROMPTS = ["def merge_sort(xs):", "SELECT name FROM users WHERE", "class LRUCache:", "fn main() {",
           "import torch\n", "The KV cache of a", "async def fetch(url):", "#include <stdio.h>\n"]


def running_replicas(serve) -> dict[str, int]:
    deployments = serve.status().applications["via-sd"].deployments
    return {name: deployments[name].replica_states.get("RUNNING", 0) for name in TIERS}


def main(out_path: str, concurrency: int = 8, load_limit_s: float = 90, settle_limit_s: float = 90) -> None:
    for var in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ[var] = "0.5"
    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from tests.serving.conftest import free_port
    from via_sd_ray.serving.app import build_app

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"frontend": 4}, "include_dashboard": False})
    nodes = {name: cluster.add_node(num_cpus=1, resources={RESOURCE[name]: 8}) for name in TIERS}
    record: dict = {"timeline": []}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ARGS), name="via-sd", route_prefix="/")

        node_of = {name: node.node_id for name, node in nodes.items()}
        node_of["Router"] = cluster.head_node.node_id
        record["placement"] = {
            name: {"on_its_node": serve.get_deployment_handle(name, "via-sd").stats.remote().result(
                timeout_s=60)["node_id"] == node_of[name]} for name in node_of}
        start = time.monotonic()

        def sample(phase: str) -> dict[str, int]:
            counts = running_replicas(serve)
            record["timeline"].append({"t": round(time.monotonic() - start, 1), "phase": phase, **counts})
            print(f"t={record['timeline'][-1]['t']:6.1f}s {phase:7s} " +
                  " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
            return counts

        stop, errors, done = threading.Event(), [], [0]

        def client(i: int) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
                while not stop.is_set():
                    body = {"model": "via-sd-tiny", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 48,
                            "temperature": 0, "ignore_eos": True, "via_sd": LOW_CONFIDENCE}
                    reply = http.post("/v1/completions", json=body)
                    if reply.status_code != 200:
                        errors.append(reply.text[:200])
                    done[0] += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        scaled_at = None
        while time.monotonic() - start < load_limit_s:
            counts = sample("load")
            if counts["FullVerifier"] >= 2 and scaled_at is None:
                scaled_at = time.monotonic()
            if scaled_at is not None and time.monotonic() - scaled_at > 6:  # hold the load a while longer
                break
            time.sleep(1)
        stop.set()
        for thread in threads:
            thread.join(timeout=130)
        record["requests"], record["errors"] = done[0], errors
        settle_start = time.monotonic()
        while time.monotonic() - settle_start < settle_limit_s:
            if all(v == 1 for v in sample("settle").values()):
                break
            time.sleep(1)
        tier_stats = {}
        for name in TIERS:
            stats = serve.get_deployment_handle(name, "via-sd").stats.remote().result(timeout_s=30)
            tier_stats[name] = {k: stats[k] for k in ("calls", "busy_seconds", "uptime_s") if k in stats}
        record["tier_stats"] = tier_stats
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
        with open(out_path, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
