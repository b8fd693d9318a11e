"""A decoder stack over the modules of a Hugging Face causal LM: embed, a chosen list of
decoder layers, final norm, LM head.

The full verifier is the stack of all layers; the slim verifier is the same model with a
subset of them (same weights, embeddings, norm and head). Driving the layers ourselves,
instead of calling the model's ``forward``, lets each stack write into its own
``KVCache``, skip layers, and compute the LM head only on the positions it needs: the
catch-up tokens of a verifier pass need KV entries but no logits.

A pass over several generations packs their rows into one sequence [1, sum(T_i)] (no row pads
another); the model's attention is ``packed_attention``, which writes each row's new keys and
values into its own cache (a KV pool slot) and attends row by row over views of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from via_sd_ray.errors import ConfigError
from via_sd_ray.models.kv_cache import KVCache, KVPool
from via_sd_ray.models.step import CompiledStep

# Architectures whose decoder layers take (hidden, attention_mask, position_ids,
# past_key_values, position_embeddings) and whose model adds nothing between them.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class DecoderStack(nn.Module):
    def __init__(self, lm: nn.Module, layers: list[int] | None = None, num_kv_heads: int | None = None):
        """``num_kv_heads``: the KV heads this process computes, when tensor parallelism gives it a share of
        them (None: all of the model's)."""
        super().__init__()
        config = lm.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model: expected an architecture in {SUPPORTED_MODEL_TYPES}, received {config.model_type!r}"
            )
        base = lm.model
        all_layers = list(base.layers)
        layers = list(range(len(all_layers))) if layers is None else check_layers(layers, len(all_layers))
        self.config = config
        self.__dict__["hf_model"] = lm  # the model these modules belong to (not registered as a submodule)
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.layers = nn.ModuleList(all_layers[i] for i in layers)
        self.norm = base.norm
        self.lm_head = lm.get_output_embeddings()
        self.layer_ids = [layer.self_attn.layer_idx for layer in self.layers]
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = num_kv_heads or config.num_key_value_heads
        self.max_context = config.max_position_embeddings
        self.compiled: CompiledStep | None = None  # the compiled pass over a pool (``compile``), else eager
        _use_packed_attention(lm)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def vocab_size(self) -> int:
        # a tensor-parallel head (DeepSpeed's LmHeadLinearAllreduce) has no out_features: its weight is [V, H / tp]
        return getattr(self.lm_head, "out_features", None) or self.lm_head.weight.shape[0]

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.layer_ids, self.num_kv_heads, self.head_dim, self.dtype, self.device, capacity)

    def new_pool(self, slots: int, slot_tokens: int) -> KVPool:
        return KVPool(self.layer_ids, self.num_kv_heads, self.head_dim, self.dtype, self.device, slots, slot_tokens)

    def pool_cache(self, pool: KVPool, slot: int) -> KVCache:
        return pool.cache(slot)

    def compile(self, pool: KVPool, max_rows: int) -> float:
        """Run passes over ``pool``'s slots of up to ``CompiledStep.max_tokens`` tokens per row as one compiled
        graph (see ``models/step.py``), warmed up now; returns the seconds warm-up took."""
        self.compiled = CompiledStep(self, pool)
        return self.compiled.warm_up(max_rows)

    def forward(self, token_ids: list[int], cache: KVCache, num_logits: int) -> torch.Tensor:
        """Run ``token_ids`` after what ``cache`` holds; return float32 logits [num_logits, V] of the last
        ``num_logits`` positions. The cache then holds ``token_ids`` too."""
        return self.forward_batch([token_ids], [cache], [num_logits])[0]

    @torch.inference_mode()
    def forward_batch(self, token_lists: list[list[int] | torch.Tensor], caches: list[KVCache],
                      num_logits: list[int]) -> list[torch.Tensor]:
        """``forward`` for several generations in one pass.

        Row i runs ``token_lists[i]`` (host ids, or a long tensor [T] already on the device: a token
        just picked there) after what ``caches[i]`` holds and gets float32 logits [num_logits[i], V] on
        the device (0 rows: a prefill chunk). The rows are packed one after another into a single
        sequence, so no row pads another; attention reads each row's cache where it lies. A cache
        records a device row's ids as unknown (-1) until ``KVCache.fill``.
        """
        device = self.device
        lengths = [len(t) for t in token_lists]
        assert all(n >= 1 for n in lengths) and all(0 <= k <= n for k, n in zip(num_logits, lengths))
        longest = max(len(cache) + n for cache, n in zip(caches, lengths))
        if longest > self.max_context:
            raise ValueError(f"sequence of {longest} tokens exceeds the context window of {self.max_context}")
        starts = [cache.begin(n) for cache, n in zip(caches, lengths)]
        if self.compiled is not None and self.compiled.accepts(caches, lengths):
            logits = self.compiled.run(token_lists, caches, starts, lengths)  # [B, T, V]
            _finish(caches, token_lists)
            return [logits[i, n - k : n] for i, (n, k) in enumerate(zip(lengths, num_logits))]
        ids = torch.cat([t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.long, device=device)
                         for t in token_lists])[None]  # [1, N]: the rows packed
        positions = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths)])[None]
        hidden = self.embed_tokens(ids)  # [1, N, H]
        rotary = self.rotary_emb(hidden, position_ids=positions)
        packed = PackedRows(caches, starts, lengths, device)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, cache=packed, use_cache=True,
                           position_embeddings=rotary, packed=packed)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        _finish(caches, token_lists)
        wanted = [off + n - k + j for off, n, k in zip(packed.offsets, lengths, num_logits) for j in range(k)]
        if not wanted:
            return [hidden.new_empty((0, self.vocab_size), dtype=torch.float32) for _ in lengths]
        rows = hidden[:, torch.tensor(wanted, device=device)]  # [1, sum(num_logits), H]
        logits = self.lm_head(self.norm(rows))[0].float()  # [sum(num_logits), V]
        return list(torch.split(logits, num_logits))


def _finish(caches: list[KVCache], token_lists: list) -> None:
    """Record each row's tokens in its cache (a device row's as unknown, -1, until ``KVCache.fill``)."""
    for cache, tokens in zip(caches, token_lists):
        cache.finish([-1] * len(tokens) if isinstance(tokens, torch.Tensor) else tokens)


class PackedRows:
    """The caches of a packed pass, as transformers' attention modules see them.

    ``update`` writes each row's new keys and values into its own cache (the only copy a pass
    makes); ``attend`` then runs attention row by row over views of each row's cache, with a mask
    only where a row's queries start after cached keys (at most [T_row, start + T_row])."""

    def __init__(self, caches: list[KVCache], starts: list[int], lengths: list[int], device):
        self.caches, self.starts, self.lengths = caches, starts, lengths
        self.offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        self.masks = [None if n == 1 or s == 0 else
                      torch.ones((n, s + n), dtype=torch.bool, device=device).tril(diagonal=s)  # [T, S]
                      for s, n in zip(starts, lengths)]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the rows' ``key``/``value`` [1, H, N, D] into their caches."""
        for cache, off, n in zip(self.caches, self.offsets, self.lengths):
            cache.write(layer_idx, key[:, :, off : off + n], value[:, :, off : off + n])
        return key, value

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention of the packed ``query`` [1, Hq, N, D] over each row's cache; returns [1, N, Hq, D]."""
        out = torch.empty_like(query)
        for cache, start, n, off, mask in zip(self.caches, self.starts, self.lengths, self.offsets, self.masks):
            keys, values = cache.layer(layer_idx, start + n)  # [1, H, S, D] views of the row's cache
            out[:, :, off : off + n] = F.scaled_dot_product_attention(
                query[:, :, off : off + n], keys, values, attn_mask=mask, is_causal=n > 1 and start == 0,
                scale=scaling, enable_gqa=keys.shape[1] != query.shape[1])
        return out.transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return min(self.starts)

    @property
    def is_compileable(self) -> bool:
        return False


PACKED_ATTENTION = "via_packed"


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     packed: PackedRows | None = None, **kwargs):
    """The attention function of a model a ``DecoderStack`` drives: packed rows when the stack runs it,
    the model's own implementation otherwise (transformers' ``generate`` on the same model)."""
    if packed is None:
        fallback = ALL_ATTENTION_FUNCTIONS.get_interface(module.via_fallback_attention, eager_attention_forward)
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return packed.attend(module.layer_idx, query, scaling), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def _use_packed_attention(lm: nn.Module) -> None:
    current = lm.config._attn_implementation
    if current == PACKED_ATTENTION:
        return
    for layer in lm.model.layers:
        layer.self_attn.via_fallback_attention = current
    lm.config._attn_implementation = PACKED_ATTENTION


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Cut ``model`` (in place) down to the decoder layers ``keep``, re-indexed from 0."""
    layers = model.model.layers
    check_layers(keep, len(layers))
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def check_layers(layers: list[int], total: int) -> list[int]:
    """``layers`` as a list, if they are increasing distinct indices of a ``total``-layer model."""
    layers = list(layers)
    if not layers or sorted(set(layers)) != layers or not 0 <= layers[0] <= layers[-1] < total:
        raise ConfigError(f"slim.layers: expected increasing distinct indices in [0, {total - 1}], received {layers}")
    return layers
