"""``serve run`` of the configs in deployments/, as a user starts them.

Every config parses with Ray's schema and ours, builds its application (``build_app``, nothing
started), lists every gRPC servicer function, and, where it runs on CPUs only, asks for no more
than a 2-core machine has. Each config that needs no download (its model sources are tiny random
models or prompt lookup) is started with the real CLI, ``serve run <config>``, in a subprocess on
free loopback ports: it must answer /health 200, serve one completion over HTTP and one over gRPC,
and report SERVING to gRPC health, then stop on Ctrl-C leaving no Ray process behind.

The subprocess starts its own local Ray (``--address local``), as ``serve run`` does for a user:
only a fresh cluster of this machine's own size shows whether the config's CPU asks fit it, and
only a fresh Serve opens the config's ports and servicer functions (a running Serve, like the
session's cluster, keeps its own and ignores them, and ``serve run`` shuts Serve down on exit).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving.conftest import free_port
from tests.serving.test_priority import thread_niceness
from via_sd_ray.config import PROMPT_LOOKUP, load_config
from via_sd_ray.models.tiny import SOURCE_PREFIX as TINY
from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb
from via_sd_ray.serving.grpc_gen import via_sd_pb2_grpc as pb_grpc
from via_sd_ray.serving.grpc_service import SERVICER_FUNCTIONS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "deployments").glob("*.yaml"))
START_LIMIT_S = 180.0  # serve run until /health answers 200
STOP_LIMIT_S = 60.0  # Ctrl-C until serve run and its Ray are gone
MACHINE_CPUS = 2  # the smallest machine the CPU configs must start on


def applications(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text())["applications"]


def needs_download(path: Path) -> bool:
    for app in applications(path):
        models = load_config(path, app["name"]).models
        if not all(m.source.startswith(TINY) or m.source == PROMPT_LOOKUP for m in (models.drafter, models.verifier)):
            return True
    return False


LOCAL = [p for p in CONFIGS if not needs_download(p)]


def resolve_profile(profile: str, config_path: Path) -> str:
    for base in (config_path.parent, ROOT):
        if (base / profile).is_file():
            return str((base / profile).resolve())
    return profile


def test_the_tiny_config_is_started_here():
    assert ROOT / "deployments" / "via_sd.tiny.yaml" in LOCAL and len(LOCAL) < len(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_builds_and_lists_every_servicer(path):
    from ray.serve.schema import ServeDeploySchema

    from via_sd_ray.serving.app import build_app

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.http_options.port and schema.grpc_options.port, "both ports: http_options and grpc_options"
    assert schema.grpc_options.grpc_servicer_functions == list(SERVICER_FUNCTIONS)
    for app in applications(path):
        config = load_config(path, app["name"])  # the profile merged in, relative to the file
        assert build_app(config.model_dump(mode="json", exclude_none=True)) is not None
        deployments = config.serving.deployments.values()
        asks = [o.ray_actor_options or {} for o in deployments]
        if not any(a.get("num_gpus") for a in asks):  # a CPU config must fit a small machine
            replicas = [o.num_replicas if isinstance(o.num_replicas, int) else
                        (o.autoscaling_config or {}).get("min_replicas", 1) for o in deployments]
            cpus = sum(a.get("num_cpus", 1) * n for a, n in zip(asks, replicas))  # Serve's default: 1 CPU
            assert cpus <= MACHINE_CPUS, f"{path.name}: the deployments ask for {cpus} CPUs"


def served_copy(path: Path, directory: Path) -> tuple[Path, int, int]:
    """The config with free loopback ports and absolute profile paths: (copy, HTTP port, gRPC port)."""
    data = yaml.safe_load(path.read_text())
    http_port, grpc_port = free_port(), free_port()
    data["http_options"].update(host="127.0.0.1", port=http_port)
    data["grpc_options"]["port"] = grpc_port
    for app in data["applications"]:
        args = app.get("args") or {}
        if args.get("profile"):
            args["profile"] = resolve_profile(args["profile"], path)
    copy = directory / path.name
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    return copy, http_port, grpc_port


class ServeRun:
    """``serve run <config>`` in its own session and Ray temp dir; ``stop`` ends it and every Ray process
    it started (those whose command line names the temp dir, and its children), returning the ones
    that outlived a Ctrl-C."""

    def __init__(self, config: Path, log: Path):
        self.ray_tmp = tempfile.mkdtemp(prefix="vsr-", dir="/tmp")  # short: Ray's socket paths must fit
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # a loaded 2-core machine can take longer than the raylet's default 30 s to start its agents
        env.update(RAY_TMPDIR=self.ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_agent_register_timeout_ms="180000")
        self.log = log
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", "--address", "local",
                                      str(config)], cwd=ROOT, env=env, stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[int, float] = {}  # pid -> create time of every process it started

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def _ours(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline", "create_time"]):
            if self.ray_tmp in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        try:
            found += psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for proc in found:
            try:
                self.seen.setdefault(proc.pid, proc.create_time())
            except psutil.NoSuchProcess:
                pass
        return found

    def _alive(self) -> list[psutil.Process]:
        self._ours()
        alive = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        return alive

    def stop(self) -> list[str]:
        self._ours()  # note the cluster's processes while they run
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: serve run shuts Serve down, then its Ray
            try:
                self.proc.wait(STOP_LIMIT_S)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 30
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in self._alive()]
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for proc in self._alive():
            proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)  # its session logs: serve run's own output is kept
        return leftovers


def _health(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return None


def _can_raise_priority() -> bool:
    """Whether a process here may lower its niceness (CAP_SYS_NICE), as a replica does for serving.niceness."""
    probe = "import os; os.setpriority(os.PRIO_PROCESS, 0, 0)"
    return subprocess.run(["nice", "-n", "5", sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.parametrize("path", LOCAL, ids=lambda p: p.name)
def test_serve_run_serves_http_and_grpc_then_stops_cleanly(path, tmp_path):
    copy, http_port, grpc_port = served_copy(path, tmp_path)
    base, target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    model = applications(path)[0]["args"]["served_model_name"]
    run = ServeRun(copy, tmp_path / "serve-run.log")
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while _health(f"{base}/health") != 200:
            assert run.proc.poll() is None, f"serve run exited ({run.proc.returncode}):\n{run.tail()}"
            assert time.monotonic() < deadline, f"no /health 200 after {START_LIMIT_S:.0f} s:\n{run.tail()}"
            time.sleep(1)
        completion = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "def add(a, b):",
                                                                "max_tokens": 8}, timeout=60)
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] >= 1
        with grpc.insecure_channel(target) as channel:
            reply = pb_grpc.ViaSDStub(channel).Generate(pb.GenerateRequest(prompt="def add(a, b):", max_tokens=8),
                                                        timeout=60)
            assert reply.token_ids and reply.usage.completion_tokens == len(reply.token_ids)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        # serving.niceness (default 0): every replica thread back from Ray's nice 15, where this machine lets
        # a process raise its priority
        replicas = [p for p in psutil.Process(run.proc.pid).children(recursive=True)
                    if any("ServeReplica" in part for part in p.cmdline())]
        assert len(replicas) >= 3, [p.cmdline()[:2] for p in replicas]
        if _can_raise_priority():
            for replica in replicas:
                niceness = thread_niceness(replica.pid)
                assert set(niceness.values()) == {0}, (replica.cmdline()[:1], niceness)
    finally:
        leftovers = run.stop()
    assert run.proc.returncode is not None
    assert len(run.seen) > 5, f"only {len(run.seen)} processes of serve run found: the leftover check sees too little"
    assert leftovers == [], f"Ray processes outlived serve run's Ctrl-C: {leftovers}\n{run.tail()}"
