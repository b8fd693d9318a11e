"""The DeepSpeed inference engine of the verifier tiers (``models.verifier.engine: deepspeed``).

``wrap`` hands the loaded Hugging Face model to ``deepspeed.init_inference``. With one rank that
converts dtype and places the model, nothing else. With ``tp`` ranks AutoTP shards it in place:
in every decoder layer q/k/v/gate/up_proj become column-parallel ``LinearLayer``s (this rank's
heads and MLP channels), o_proj and down_proj row-parallel ``LinearAllreduce``s (partial sums
all-reduced over the ranks), and lm_head an ``LmHeadLinearAllreduce``. Embeddings, norms and
rotary stay whole. The decoder layers' own ``forward`` is untouched, and transformers' attention
reshapes to ``-1`` heads, so ``DecoderStack`` drives the sharded layers as before: each rank runs
its heads and writes its KV heads (``local_kv_heads``) into its own KV cache, so the caches are
sharded like the weights. Every rank must run every forward pass together (``models.sharded``).

Kernel injection (``replace_with_kernel_inject``) is never used, on GPUs either: it swaps the
decoder layers for DeepSpeed's fused ``DeepSpeedTransformerInference`` modules, which keep one
sequence's KV cache in DeepSpeed's workspace and have no policy for qwen2. Per-generation
caches, rollback, catch-up and ragged batches, which are what ``DecoderStack`` is for, would go.

The all-reduce on CPU. DeepSpeed's ``TorchBackend`` JIT-builds a shared-memory all-reduce op on
CPU and, once built, ``inference_all_reduce`` always takes it (no setting selects
``torch.distributed.all_reduce`` instead: deepspeedai/DeepSpeed#7625). The op maps its peers'
buffers only when ``LOCAL_SIZE`` (set by DeepSpeed's launcher, not by torchrun or Ray) equals the
world size; otherwise it reduces through null pointers: the SIGSEGV seen under torchrun. It also
returns float64 tensors unreduced, builds with a C++ compiler in every new container, and leaves
~66 MB per rank in /dev/shm that it never unlinks. So on CPU ``init_group`` marks the op
incompatible before DeepSpeed's communication starts (DeepSpeed keeps that probe in one module
dict, ``deepspeed.ops.__compatible_ops__``, whose edits persist by design), and the all-reduce is
gloo's. GPUs take NCCL through the same ``inference_all_reduce``, which this does not touch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from torch import nn

from via_sd_ray.errors import ConfigError

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory all-reduce op (ShareMemCommBuilder.NAME)


def require() -> None:
    """Raise a ConfigError naming the field when the deepspeed package is missing."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ConfigError("models.verifier.engine: expected an installed deepspeed package for engine 'deepspeed' "
                          f"(pip install 'via-sd-ray[deepspeed]'), received an import error: {err}") from None


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one tensor-parallel group meet (rank 0 listens on ``address:port``)."""

    address: str
    port: int
    world_size: int
    timeout_s: float = 120.0  # a collective waiting longer on a dead peer raises instead of hanging


def device_name() -> str:
    """The device DeepSpeed places the model on: ``cpu``, or ``cuda:N`` (the GPU this process was given)."""
    require()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def init_group(rank: int, rendezvous: Rendezvous) -> None:
    """Join the group as ``rank`` (blocks until every rank has joined) and start DeepSpeed's communication on it."""
    require()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a process group; a tensor-parallel rank needs its own")
    accelerator = get_accelerator()
    backend = accelerator.communication_backend_name()  # nccl on GPUs, gloo on CPU (ccl with oneCCL installed)
    if accelerator.device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[SHM_OP] = False  # see the module docstring
    dist.init_process_group(backend, init_method=f"tcp://{rendezvous.address}:{rendezvous.port}", rank=rank,
                            world_size=rendezvous.world_size, timeout=timedelta(seconds=rendezvous.timeout_s))
    os.environ.setdefault("RANK", str(rank))  # DeepSpeed's logging reads these
    os.environ.setdefault("WORLD_SIZE", str(rendezvous.world_size))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=rendezvous.timeout_s))


def wrap(model: nn.Module, tp_size: int = 1) -> nn.Module:
    """``model`` under ``deepspeed.init_inference`` (AutoTP across the ``tp_size`` ranks of the process group
    when ``tp_size`` > 1), returned as the Hugging Face module the engine wraps."""
    require()
    import deepspeed
    import torch.distributed as dist

    if tp_size > 1 and (not dist.is_initialized() or dist.get_world_size() != tp_size):
        raise RuntimeError(f"tensor parallelism over {tp_size} ranks needs a process group of {tp_size} (init_group)")
    dtype = next(model.parameters()).dtype
    engine = deepspeed.init_inference(model, dtype=dtype, tensor_parallel={"tp_size": tp_size},
                                      replace_with_kernel_inject=False)
    return engine.module


def local_kv_heads(model: nn.Module) -> int:
    """The KV heads this rank computes: its share of k_proj's output rows (AutoTP splits them by head)."""
    attention = model.model.layers[0].self_attn
    return attention.k_proj.weight.shape[0] // attention.head_dim


def shutdown() -> None:
    """Leave the process group (a rank's last act; the group cannot be joined again in this process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
