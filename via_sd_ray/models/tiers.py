"""Building tier runners and the text-side facts (tokenizer, EOS ids, context window) from config.

The in-process engine loads the verifier once and gives the slim verifier a view of its
layers; a serving process hosting one tier loads only what that tier needs (a slim
verifier process reads only the slim layers from the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

from via_sd_ray.config import PROMPT_LOOKUP, EngineConfig, ModelConfig
from via_sd_ray.core.ngram import PromptLookupDrafter
from via_sd_ray.errors import ConfigError
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.loading import eos_token_ids, load_model, load_tokenizer, resolve
from via_sd_ray.models.runner import TierRunner

TIERS = ("drafter", "slim", "full")


@dataclass
class TextInfo:
    """What the router needs of the models without loading any weights."""

    tokenizer: object
    eos_token_ids: tuple[int, ...]
    max_context: int

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def load(cfg: ModelConfig, layers: list[int] | None = None):
    return load_model(resolve(cfg.source, cfg.revision), cfg.dtype, layers=layers,
                      attn_implementation=cfg.attn_implementation, quantization=cfg.quantization,
                      device=resolve_device(cfg.device))


def resolve_device(name: str) -> str:
    """``auto``: the first visible GPU (Ray sets CUDA_VISIBLE_DEVICES per replica), else the CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"models.*.device: expected a device this process has (cpu), received {name!r}: "
                          "no GPU is visible here")
    return name


def build_drafter(config: EngineConfig, verifier_vocab: int) -> TierRunner | PromptLookupDrafter:
    cfg = config.models.drafter
    if cfg.source == PROMPT_LOOKUP:
        return PromptLookupDrafter(cfg.max_ngram, cfg.min_ngram)
    model = load(cfg)
    vocab = model.get_output_embeddings().out_features
    if vocab != verifier_vocab:
        raise ConfigError(
            f"models.drafter.source: expected a model with the verifier's vocabulary ({verifier_vocab} tokens), "
            f"received {cfg.source!r} with {vocab}"
        )
    return TierRunner(DecoderStack(model), config.limits.max_cache_bytes, name="drafter")


def build_tier(config: EngineConfig, tier: str) -> TierRunner | PromptLookupDrafter:
    """The runner of one tier, loading only what it needs (for a process that hosts only this tier)."""
    budget = config.limits.max_cache_bytes
    if tier == "drafter":
        return build_drafter(config, _vocab_size(config.models.verifier))
    if tier == "slim":
        layers = config.slim.layers
        return TierRunner(DecoderStack(load(config.models.verifier, layers)), budget, name="slim")
    if tier == "full":
        return TierRunner(DecoderStack(load(config.models.verifier)), budget, name="full")
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
