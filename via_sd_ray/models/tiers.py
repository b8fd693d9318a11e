"""Building tier runners and the text-side facts (tokenizer, EOS ids, context window) from config.

The in-process engine loads the verifier once and gives the slim verifier a view of its
layers; a serving process hosting one tier loads only what that tier needs (a slim
verifier process reads only the slim layers from the checkpoint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from via_sd_ray.config import PROMPT_LOOKUP, DrafterConfig, EngineConfig, ModelConfig, ServingConfig
from via_sd_ray.core.ngram import PromptLookupDrafter
from via_sd_ray.errors import ConfigError
from via_sd_ray.models import ds_engine, step
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.kv_cache import KVPool, bytes_per_token, free_device_bytes
from via_sd_ray.models.loading import (
    eos_token_ids,
    load_model,
    load_tokenizer,
    resolve,
    resolve_activations,
    resolve_precision,
)
from via_sd_ray.models.runner import TierRunner
from via_sd_ray.models.sharded import ShardedStack, ShardGroup, ShardLauncher, ShardSpec

TIERS = ("drafter", "slim", "full")
VOCAB_PADDING = 512  # most rows a verifier's LM head may have beyond its drafter's (padding for kernels)
DEFAULT_SLOT_TOKENS = 8192  # kv_slot_tokens when unset, unless the context window is shorter

log = logging.getLogger(__name__)


@dataclass
class TextInfo:
    """What the router needs of the models without loading any weights."""

    tokenizer: object
    eos_token_ids: tuple[int, ...]
    max_context: int

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def load(cfg: ModelConfig, layers: list[int] | None = None, device: str | None = None,
         linear_kernel: str | None = None):
    """``device``: where to load it, when that is not where it runs (``cfg.device``; dtype is chosen for that)."""
    target = resolve_device(cfg.device)
    source = resolve(cfg.source, cfg.revision)
    drafter = isinstance(cfg, DrafterConfig)
    precision = "bf16" if getattr(cfg, "engine", "hf") == "deepspeed" else resolve_precision(
        cfg.precision, source, target, drafter)
    int8 = resolve_activations(cfg.activations, precision, target, drafter)
    vocab = getattr(cfg, "draft_vocab", None)
    return load_model(source, cfg.dtype, layers=layers, attn_implementation=cfg.attn_implementation,
                      precision=precision, device=device or target, linear_kernel=linear_kernel or cfg.linear_kernel,
                      dtype_device=target, int8_activations=int8, draft_vocab=vocab and (vocab.file, vocab.size))


def verifier_stacks(config: EngineConfig, stacks: dict[str, list[int] | None], load_layers: list[int] | None = None,
                    launcher: ShardLauncher | None = None) -> dict[str, DecoderStack | ShardedStack]:
    """The verifier's decoder stacks ``stacks`` (name -> layers of the loaded model; None: all) over one
    loaded copy of its layers ``load_layers``, on the configured engine. With tensor_parallel_size > 1,
    ``launcher`` starts the other ranks and the stacks returned drive them."""
    cfg = config.models.verifier
    tp = cfg.tensor_parallel_size
    if tp == 1:
        return build_shard(ShardSpec(cfg, load_layers, stacks, rendezvous=None), rank=0)
    if launcher is None:
        raise ConfigError(f"models.verifier.tensor_parallel_size: expected 1 in a single process, received {tp}: "
                          "the other ranks are Ray actors (serve the tiers with Ray Serve)")
    rendezvous = ds_engine.Rendezvous(launcher.address(), _free_port(), tp, config.serving.tier_timeout_s)
    spec = ShardSpec(cfg, load_layers, stacks, rendezvous, config.threads)
    peers = launcher.start(spec)
    try:
        own = build_shard(spec, rank=0)  # returns once every rank has joined the group and sharded its model
        peers.ready()
    except BaseException:
        peers.close()
        raise
    group = ShardGroup(peers)
    return {name: ShardedStack(stack, name, group) for name, stack in own.items()}


def build_shard(spec: ShardSpec, rank: int) -> dict[str, DecoderStack]:
    """Rank ``rank``'s decoder stacks of ``spec``: join the group (if any), load, shard with DeepSpeed."""
    import torch

    cfg = spec.model
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if cfg.engine == "deepspeed":
        ds_engine.require()
        device = resolve_device(cfg.device)
        if torch.device(device).type != torch.device(ds_engine.device_name()).type:
            raise ConfigError(f"models.verifier.device: expected {ds_engine.device_name()!r} (where DeepSpeed puts "
                              f"the model) with engine 'deepspeed', received {cfg.device!r}")
        if spec.rendezvous is not None and spec.rendezvous.world_size > 1:
            ds_engine.init_group(rank, spec.rendezvous)
        # loaded on the host: AutoTP shards it there and moves this rank's shard to the device
        # (with torch's own linear layers, which AutoTP replaces)
        model = ds_engine.wrap(load(cfg, spec.load_layers, device="cpu", linear_kernel="aten"),
                               cfg.tensor_parallel_size)
        kv_heads = ds_engine.local_kv_heads(model)
    else:
        model, kv_heads = load(cfg, spec.load_layers), None
    return {name: DecoderStack(model, layers, num_kv_heads=kv_heads) for name, layers in spec.stacks.items()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def resolve_device(name: str) -> str:
    """``auto`` outside a scheduler: the first visible GPU, else the CPU. A Ray replica's ``auto`` is
    decided by the accelerators Ray assigned it, before this (``placed``): Ray no longer hides the GPUs
    from an actor that asked for none."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"models.*.device: expected a device this process has (cpu), received {name!r}: "
                          "no GPU is visible here")
    return name


def placed(config: EngineConfig, accelerator_ids: list | None) -> EngineConfig:
    """``config`` with every ``device: auto`` made ``assigned_device(accelerator_ids)``."""
    models = {name: placed_model(getattr(config.models, name), accelerator_ids) for name in ("drafter", "verifier")}
    return config.model_copy(update={"models": config.models.model_copy(update=models)})


def placed_model(cfg: ModelConfig, accelerator_ids: list | None) -> ModelConfig:
    if cfg.device != "auto" or accelerator_ids is None:
        return cfg
    return cfg.model_copy(update={"device": assigned_device(accelerator_ids)})


def assigned_device(accelerator_ids: list) -> str:
    """The device of the GPU ids a scheduler (Ray: ``ray.get_gpu_ids()``) assigned this process: none ->
    cpu, even where CUDA sees GPUs; some -> the first of them (``cuda:0`` when the scheduler narrowed
    CUDA_VISIBLE_DEVICES to them, as Ray does, else ``cuda:<id>``)."""
    import os

    if not accelerator_ids:
        return "cpu"
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES") not in (None, "", "0"):
        return f"cuda:{int(accelerator_ids[0])}"
    return "cuda:0"


def build_drafter(config: EngineConfig, verifier_vocab: int) -> TierRunner | PromptLookupDrafter:
    cfg = config.models.drafter
    if cfg.source == PROMPT_LOOKUP:
        return PromptLookupDrafter(cfg.max_ngram, cfg.min_ngram)
    model = load(cfg)
    vocab = model.draft_vocab.vocab if hasattr(model, "draft_vocab") else model.get_output_embeddings().out_features
    # the same tokenizer, the verifier's head padded further (Qwen2.5-Coder 0.5B / 1.5B: 151,936 rows; 7B / 32B:
    # 152,064): the drafter never proposes the padding
    if not verifier_vocab - VOCAB_PADDING <= vocab <= verifier_vocab:
        raise ConfigError(
            f"models.drafter.source: expected a model with the verifier's vocabulary ({verifier_vocab} tokens, or "
            f"up to {VOCAB_PADDING} fewer of padding), received {cfg.source!r} with {vocab}"
        )
    return tier_runner(DecoderStack(model), config, "drafter")


def kv_pool(stack: DecoderStack, serving: ServingConfig, budget: int | None = None) -> KVPool:
    """The stack's KV pool: slots of ``serving.kv_slot_tokens`` tokens, as many as the byte budget holds
    (``budget``, else ``serving.kv_cache_bytes``, else ``kv_cache_fraction`` of the device's free memory, or of
    the replica's ``serving.gpu_memory_share`` of a GPU it shares)."""
    slot_tokens = min(serving.kv_slot_tokens or DEFAULT_SLOT_TOKENS, stack.max_context)
    per_slot = bytes_per_token(len(stack.layer_ids), stack.num_kv_heads, stack.head_dim, stack.dtype) * slot_tokens
    budget = budget or serving.kv_cache_bytes or int(
        serving.kv_cache_fraction * free_device_bytes(stack.device, serving.gpu_memory_share))
    slots = min(budget // per_slot, serving.kv_max_slots)
    if slots < 1:
        raise ConfigError(f"serving.kv_cache_bytes: expected room for one KV slot of {slot_tokens} tokens "
                          f"({per_slot} bytes; lower serving.kv_slot_tokens or raise the budget), received a "
                          f"budget of {budget} bytes")
    return stack.new_pool(slots, slot_tokens)


def tier_runner(stack: DecoderStack, config: EngineConfig, name: str) -> TierRunner:
    """A runner over ``stack`` with its KV pool, chunked prefill, prefix reuse and compiled passes as configured."""
    serving = config.serving
    pool = kv_pool(stack, serving, config.limits.max_cache_bytes)
    log.info("%s tier: KV pool of %s on %s", name, pool.describe(), stack.device)
    model = config.models.drafter if name == "drafter" else config.models.verifier
    if compiled(model.compile, stack, name):
        seconds = stack.compile(pool, max_rows=min(serving.batch_size, pool.slots))
        log.info("%s tier: compiled passes warmed up in %.1f s", name, seconds)
    return TierRunner(stack, pool, name, serving.prefill_chunk_tokens, serving.prefix_min_tokens,
                      serving.proposal_top_k)


def compiled(setting: str, stack: DecoderStack, name: str) -> bool:
    """Whether a tier's stack runs compiled: ``compile`` on, or auto on CUDA; a stack that cannot be compiled
    (tensor parallel) runs eagerly under auto and is a config error under on."""
    reason = step.unsupported(stack)
    if setting == "on" and reason:
        raise ConfigError(f"models.{'drafter' if name == 'drafter' else 'verifier'}.compile: expected 'auto' or "
                          f"'off' for the {name} tier, received 'on' ({reason})")
    return reason is None and (setting == "on" or setting == "auto" and stack.device.type == "cuda")


def build_tier(config: EngineConfig, tier: str, launcher: ShardLauncher | None = None
               ) -> TierRunner | PromptLookupDrafter:
    """The runner of one tier, loading only what it needs (for a process that hosts only this tier).
    ``launcher`` starts a verifier tier's other tensor-parallel ranks (tensor_parallel_size > 1)."""
    if tier == "drafter":
        return build_drafter(config, _vocab_size(config.models.verifier))
    if tier == "slim":
        stack = verifier_stacks(config, {"slim": None}, config.slim.layers, launcher)["slim"]
        return tier_runner(stack, config, "slim")
    if tier == "full":
        return tier_runner(verifier_stacks(config, {"full": None}, None, launcher)["full"], config, "full")
    raise ConfigError(f"tier: expected one of {TIERS}, received {tier!r}")


def text_info(config: EngineConfig) -> TextInfo:
    """Tokenizer, EOS ids and context window of the configured models."""
    from transformers import AutoConfig, GenerationConfig

    source = resolve(config.models.verifier.source, config.models.verifier.revision)
    tokenizer = load_tokenizer(source)
    if source.kind == "dir":
        model_config = AutoConfig.from_pretrained(source.location)
        try:
            generation = GenerationConfig.from_pretrained(source.location)
        except OSError:
            generation = None
        holder = _ConfigHolder(model_config, generation)
    else:  # tiny models build in milliseconds; GGUF metadata needs the transformers loader anyway
        holder = load(config.models.verifier)
    contexts = [holder.config.max_position_embeddings]
    if config.models.drafter.source != PROMPT_LOOKUP:
        drafter = resolve(config.models.drafter.source, config.models.drafter.revision)
        if drafter.kind == "dir":
            contexts.append(AutoConfig.from_pretrained(drafter.location).max_position_embeddings)
    return TextInfo(tokenizer, eos_token_ids(holder, tokenizer), min(contexts))


@dataclass
class _ConfigHolder:
    """Stands in for a model where only ``config`` and ``generation_config`` are read."""

    config: object
    generation_config: object


def _vocab_size(cfg: ModelConfig) -> int:
    from transformers import AutoConfig

    source = resolve(cfg.source, cfg.revision)
    if source.kind == "dir":
        return AutoConfig.from_pretrained(source.location).vocab_size
    return load_model(source, cfg.dtype, layers=[0]).get_output_embeddings().out_features
