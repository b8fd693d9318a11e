"""Tensor parallelism over Ray: verifier tiers at tensor_parallel_size 2 in a placement group give the
tokens of tensor_parallel_size 1, and a dead rank fails them.

Run by ``test_tensor_parallel.py`` (and, with SmolLM2, ``tests/slow/test_deepspeed_smollm2.py``) in a
subprocess (the other serving tests hold a one-node cluster for the session):
``python -m tests.serving.tp_scenario OUT.json [tiny|smollm2]``. On its own local Ray (4 CPUs) it

1. creates a placement group of two 1-CPU bundles and, in bundle 0, an actor holding a
   ``LocalEngine`` at tensor_parallel_size 2: rank 0 in the actor, rank 1 started by
   ``RayShardLauncher`` in bundle 1 (gloo over the node's address, DeepSpeed AutoTP);
2. generates greedily in ar, sd, via-sd and lossless via-sd through the slim verifier, and
   compares with tensor_parallel_size 1 (engine deepspeed, in this process);
3. kills the rank-1 actor and records what the health check and the next generation raise;
4. (tiny only) serves the whole application with both verifier tiers at tensor_parallel_size 2
   (``placement_group_bundles`` of two bundles per replica), checks served token ids against
   tensor_parallel_size 1 for ar, sd and via-sd, kills the FullVerifier replica's rank-1 worker
   process and records how the replica is replaced and serves the same tokens again;

and writes what it saw as JSON.
"""

from __future__ import annotations

import json
import sys
import time

SETUPS = {
    "tiny": {
        "models": {"drafter": {"source": "tiny-random:drafter", "dtype": "float32", "quantization": "none"},
                   "verifier": {"source": "tiny-random:verifier", "dtype": "float32"}},
        "slim": {"layers": [0, 1, 3]},
        "prompts": ["a", "hello world", "def add(a, b):\n    return a + b\n\nprint(add(1, 2))"],
        "chat": False,
        "max_tokens": 24,
    },
    # 3 KV heads over 2 ranks: an uneven split (2 + 1 heads, 6 + 3 query heads)
    "smollm2": {
        "models": {"drafter": {"source": "prompt-lookup"},
                   "verifier": {"source": "smollm2-135m-instruct", "dtype": "float32"}},
        "slim": {"layers": list(range(0, 24)) + [27, 29]},
        "prompts": ["Write a Python function that returns the n-th Fibonacci number.",
                    "List three facts about the Moon."],
        "chat": True,
        "max_tokens": 32,
    },
}
POLICIES = {
    "ar": {"mode": "ar"},
    "sd": {"mode": "sd", "block_size": 4},
    "via-sd": {"mode": "via-sd", "block_size": 4},
    "via-sd-lossless-slim": {"mode": "via-sd", "block_size": 4, "lossless": True, "slim_threshold": 0.0},
}


def args(setup: str, tp: int) -> dict:
    chosen = SETUPS[setup]
    verifier = {**chosen["models"]["verifier"], "engine": "deepspeed", "tensor_parallel_size": tp}
    return {
        "models": {**chosen["models"], "verifier": verifier},
        "slim": chosen["slim"],
        "threads": 1,
        "serving": {"tier_timeout_s": 30},  # a collective waiting on a dead rank gives up after this
    }


def generate_all(engine, setup: str) -> dict:
    from via_sd_ray.core.policy import RouterPolicy
    from via_sd_ray.core.sampling import SamplingParams

    chosen = SETUPS[setup]
    out = {}
    for name, policy in POLICIES.items():
        for text in chosen["prompts"]:
            ids = engine.encode(text, chat=chosen["chat"])
            result = engine.generate(ids, SamplingParams(max_tokens=chosen["max_tokens"]), RouterPolicy(**policy))
            out[f"{name} {text!r}"] = {"tokens": result.token_ids, "tiers": result.stats.tier_blocks}
    return out


def main(path: str, setup: str = "tiny") -> None:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from via_sd_ray.config import parse_config
    from via_sd_ray.models.local import LocalEngine

    @ray.remote
    class Host:
        """Stands in for a tier replica: rank 0 in bundle 0."""

        def __init__(self, pg):
            from via_sd_ray.serving.tp_workers import RayShardLauncher

            start = time.perf_counter()
            self.engine = LocalEngine(parse_config(args(setup, 2)), launcher=RayShardLauncher("FullVerifier", pg))
            self.build_s = time.perf_counter() - start

        def info(self) -> dict:
            stack = self.engine.full.stack
            attn = stack.layers[0].self_attn
            return {"build_s": self.build_s, "kv_heads": stack.num_kv_heads,
                    "q_proj": type(attn.q_proj).__name__, "o_proj": type(attn.o_proj).__name__,
                    "lm_head": type(stack.lm_head).__name__, "q_rows": attn.q_proj.weight.shape[0]}

        def generate_all(self) -> dict:
            start = time.perf_counter()
            out = generate_all(self.engine, setup)
            return {"outputs": out, "seconds": time.perf_counter() - start}

        def workers(self) -> list:
            return self.engine.full.stack.group.peers.actors

        def try_(self, what: str) -> str | None:
            from via_sd_ray.core.policy import RouterPolicy
            from via_sd_ray.core.sampling import SamplingParams

            try:
                if what == "check":
                    self.engine.full.check_health()
                else:
                    self.engine.generate(self.engine.encode("hello"), SamplingParams(max_tokens=8),
                                         RouterPolicy(mode="ar"))
            except Exception as err:
                return f"{type(err).__name__}: {err}"[:400]
            return None

    record: dict = {}
    ray.init(address="local", num_cpus=4, log_to_driver=False, include_dashboard=True)  # the state API: step 4
    try:
        pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=60)
        host = Host.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0)).remote(pg)
        record["tp2_info"] = ray.get(host.info.remote(), timeout=300)
        tp2 = ray.get(host.generate_all.remote(), timeout=300)
        record["tp2_seconds"] = tp2["seconds"]
        start = time.perf_counter()
        tp1 = generate_all(LocalEngine(parse_config(args(setup, 1))), setup)
        record["tp1_seconds"] = time.perf_counter() - start
        record["mismatches"] = {k: {"tp1": v, "tp2": tp2["outputs"][k]} for k, v in tp1.items()
                                if v["tokens"] != tp2["outputs"][k]["tokens"]}
        record["slim_blocks"] = sum(v["tiers"]["slim"] for v in tp2["outputs"].values())
        record["compared"] = len(tp1)
        record["healthy_before_kill"] = ray.get(host.try_.remote("check"), timeout=60)
        (worker,) = ray.get(host.workers.remote(), timeout=60)
        ray.kill(worker)
        time.sleep(1.0)
        record["check_after_kill"] = ray.get(host.try_.remote("check"), timeout=60)
        start = time.perf_counter()
        record["generate_after_kill"] = ray.get(host.try_.remote("generate"), timeout=120)
        record["generate_after_kill_s"] = time.perf_counter() - start
        ray.kill(host)
        ray.util.remove_placement_group(pg)
        if setup == "tiny":
            serve_scenario(record, setup)
    finally:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        ray.shutdown()


def serve_scenario(record: dict, setup: str) -> None:
    import os
    import signal
    import socket

    import httpx
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from via_sd_ray.config import parse_config
    from via_sd_ray.core.sampling import SamplingParams
    from via_sd_ray.models.local import LocalEngine
    from via_sd_ray.serving.app import build_app

    app = "via-sd-tp"
    tier = {"ray_actor_options": {"num_cpus": 0.25}, "placement_group_bundles": [{"CPU": 0.25}, {"CPU": 0.25}],
            "placement_group_strategy": "STRICT_PACK", "health_check_period_s": 1, "health_check_timeout_s": 20}
    front = {"ray_actor_options": {"num_cpus": 0.1}}
    served = {**args(setup, 2), "served_model_name": app}
    served["serving"] = {**served["serving"], "deployments": {
        "Ingress": front, "Router": front, "Drafter": front, "SlimVerifier": tier, "FullVerifier": tier}}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    start = time.perf_counter()
    serve.run(build_app(served), name=app, route_prefix="/")
    record["serve_start_s"] = time.perf_counter() - start

    reference = LocalEngine(parse_config(args(setup, 1)))
    prompt = SETUPS[setup]["prompts"][1]
    ids = reference.encode(prompt)

    def served_tokens(mode: str) -> list[int]:
        body = {"model": app, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                "via_sd": {"mode": mode, "return_token_ids": True}}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        reply.raise_for_status()
        return reply.json()["choices"][0]["token_ids"]

    def expected(mode: str) -> list[int]:
        policy = reference.config.router.policy(mode=mode)
        return reference.generate(ids, SamplingParams(max_tokens=24), policy).token_ids

    record["served_mismatches"] = [mode for mode in ("ar", "sd", "via-sd") if served_tokens(mode) != expected(mode)]

    def full_verifier() -> dict:
        return serve.get_deployment_handle("FullVerifier", app).stats.remote().result(timeout_s=60)

    before = full_verifier()
    # name this cluster: another test's Ray may still be winding down on the machine
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    replica = [a for a in actors if a["class_name"].endswith(":FullVerifier")]
    workers = [a for a in actors if a["class_name"] == "_ShardActor"
               and a["placement_group_id"] == replica[0]["placement_group_id"]]
    record["full_verifier_workers"] = len(workers)
    os.kill(workers[0]["pid"], signal.SIGKILL)
    start, failures = time.perf_counter(), []
    while time.perf_counter() - start < 180:
        try:
            tokens = served_tokens("sd")
            after = full_verifier()
            if after["pid"] != before["pid"]:
                record["recovered_s"] = time.perf_counter() - start
                record["recovered_tokens_equal"] = tokens == expected("sd")
                break
        except Exception as err:
            failures.append(f"{type(err).__name__}: {err}"[:200])
        time.sleep(1.0)
    record["failures_while_replaced"] = failures[:5]
    record["failed_requests_while_replaced"] = len(failures)
    serve.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
