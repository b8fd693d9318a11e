"""``device: auto`` follows the accelerators the scheduler assigned, not what CUDA reports: a Ray replica
given no GPU runs on the CPU even where CUDA sees GPUs (Ray no longer hides them from such actors)."""

from __future__ import annotations

import pytest
import torch

from via_sd_ray.config import parse_config
from via_sd_ray.models import tiers
from via_sd_ray.models.tiers import assigned_device, placed, resolve_device
from via_sd_ray.serving import tp_workers
from via_sd_ray.serving.tiers import TierServer

ARGS = {"models": {"drafter": {"source": "tiny-random:drafter"},
                   "verifier": {"source": "tiny-random:verifier", "device": "cpu"}},
        "slim": {"layers": [0, 2]}, "serving": {"kv_max_slots": 2, "kv_slot_tokens": 256}}


@pytest.fixture
def cuda_reported(monkeypatch):
    """torch says a GPU is there (none is)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_outside_a_scheduler_is_the_visible_gpu(cuda_reported):
    assert resolve_device("auto") == "cuda"


def test_a_replica_given_no_gpu_is_placed_on_the_cpu_although_cuda_is_reported(cuda_reported):
    config = placed(parse_config(ARGS), [])
    assert config.models.drafter.device == "cpu"
    assert config.models.verifier.device == "cpu"  # an explicit device stays


def test_a_replica_given_gpus_runs_on_the_first_of_them(monkeypatch):
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    assert assigned_device([3]) == "cuda:0"  # Ray narrowed CUDA_VISIBLE_DEVICES to GPU 3
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    assert assigned_device([3, 5]) == "cuda:3"  # every GPU visible: the assigned one by its index
    assert placed(parse_config(ARGS), None).models.drafter.device == "auto"  # no scheduler: left to auto


def test_outside_ray_there_are_no_assigned_accelerators():
    assert tp_workers.accelerator_ids() is None


def test_a_tier_replica_assigned_no_gpu_builds_on_the_cpu(cuda_reported, monkeypatch):
    monkeypatch.setattr(tp_workers, "accelerator_ids", lambda: [])
    seen = []
    build = tiers.build_tier

    def spy(config, tier, launcher=None):
        seen.append(config.models.drafter.device)
        return build(config, tier, launcher)

    monkeypatch.setattr(tiers, "build_tier", spy)
    server = TierServer(ARGS, "drafter", warm_up=False)
    assert seen == ["cpu"]
    assert server.runner.stack.device.type == "cpu"


def test_a_replica_sharing_a_gpu_sizes_its_kv_pool_from_its_own_share(monkeypatch):
    """Two replicas on one GPU (num_gpus 0.25 / 0.75): what is free to each is its share of the GPU less
    what it holds, whichever started first; never more than the GPU has free."""
    from via_sd_ray.models.kv_cache import free_device_bytes

    gib = 2**30
    free = {"now": 20 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["now"], 24 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1 * gib)  # its weights
    assert free_device_bytes("cuda:0") == 20 * gib  # a whole GPU: what is free
    assert free_device_bytes("cuda:0", 0.25) == 5 * gib  # 6 GiB share, 1 GiB held
    free["now"] = 4 * gib  # the other replica started first and took most of the GPU
    assert free_device_bytes("cuda:0", 0.75) == 4 * gib
    assert free_device_bytes("cuda:0", 1.0) == 4 * gib


def test_a_tier_replica_takes_its_gpu_share_from_ray(monkeypatch):
    assert tp_workers.gpu_share() is None  # outside Ray
    monkeypatch.setattr(tp_workers, "accelerator_ids", lambda: [])
    monkeypatch.setattr(tp_workers, "gpu_share", lambda: 0.25)
    assert TierServer(ARGS, "drafter", warm_up=False).config.serving.gpu_memory_share == 0.25
    given = {**ARGS, "serving": {**ARGS["serving"], "gpu_memory_share": 0.5}}  # the config's own wins
    assert TierServer(given, "drafter", warm_up=False).config.serving.gpu_memory_share == 0.5
