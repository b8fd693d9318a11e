"""A decoder stack over the modules of a Hugging Face causal LM: embed, a chosen list of
decoder layers, final norm, LM head.

The full verifier is the stack of all layers; the slim verifier is the same model with a
subset of them (same weights, embeddings, norm and head). Driving the layers ourselves,
instead of calling the model's ``forward``, lets each stack write into its own
``KVCache``, skip layers, and compute the LM head only on the positions it needs: the
catch-up tokens of a verifier pass need KV entries but no logits.
"""

from __future__ import annotations

import torch
from torch import nn

from via_sd_ray.errors import ConfigError
from via_sd_ray.models.kv_cache import KVCache

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

    @torch.inference_mode()
    def forward(self, token_ids: list[int], cache: KVCache, num_logits: int) -> torch.Tensor:
        """Run ``token_ids`` after what ``cache`` holds; return float32 logits [num_logits, V] of the last
        ``num_logits`` positions. The cache then holds ``token_ids`` too."""
        n = len(token_ids)
        assert 1 <= num_logits <= n
        start = cache.begin(n)
        if start + n > self.max_context:
            raise ValueError(f"sequence of {start + n} tokens exceeds the context window of {self.max_context}")
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, T]
        hidden = self.embed_tokens(ids)  # [1, T, H]
        positions = torch.arange(start, start + n, device=self.device)[None]  # [1, T]
        rotary = self.rotary_emb(hidden, position_ids=positions)
        mask = _causal_mask(start, n, hidden.dtype, self.device)  # [1, 1, T, start + T] or None
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True, position_embeddings=rotary)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        cache.finish(token_ids)
        hidden = self.norm(hidden[:, n - num_logits :])  # [1, num_logits, H]
        return self.lm_head(hidden)[0].float()  # [num_logits, V]


    @torch.inference_mode()
    def forward_batch(self, token_lists: list[list[int]], caches: list[KVCache],
                      num_logits: list[int]) -> list[torch.Tensor]:
        """``forward`` for several generations in one pass (ragged lengths, right-padded).

        Row i runs ``token_lists[i]`` after what ``caches[i]`` holds and gets float32 logits
        [num_logits[i], V]. One row takes exactly the unbatched path.
        """
        if len(token_lists) == 1:
            return [self.forward(token_lists[0], caches[0], num_logits[0])]
        lengths = [len(t) for t in token_lists]
        starts = [cache.begin(n) for cache, n in zip(caches, lengths)]
        if any(s + n > self.max_context for s, n in zip(starts, lengths)):
            raise ValueError(f"a sequence exceeds the context window of {self.max_context}")
        width = max(lengths)
        ids = torch.zeros((len(lengths), width), dtype=torch.long, device=self.device)  # [B, T]
        positions = torch.zeros_like(ids)  # [B, T]
        for i, (tokens, start, n) in enumerate(zip(token_lists, starts, lengths)):
            ids[i, :n] = torch.tensor(tokens, dtype=torch.long)
            positions[i] = torch.arange(start, start + width).clamp_max(start + n - 1)
        hidden = self.embed_tokens(ids)  # [B, T, H]
        rotary = self.rotary_emb(hidden, position_ids=positions)
        view = _BatchedCache(caches, starts, lengths)
        mask = view.mask(width, hidden.dtype, self.device)  # [B, 1, T, S]
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=view,
                           use_cache=True, position_embeddings=rotary)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        rows = [hidden[i, n - k : n] for i, (n, k) in enumerate(zip(lengths, num_logits))]
        for cache, tokens in zip(caches, token_lists):
            cache.finish(tokens)
        logits = self.lm_head(self.norm(torch.cat(rows)[None]))[0].float()  # [sum(num_logits), V]
        return list(torch.split(logits, num_logits))


class _BatchedCache:
    """Presents the per-generation caches of a batch to the attention modules as one padded cache."""

    def __init__(self, caches: list[KVCache], starts: list[int], lengths: list[int]):
        self.caches, self.starts, self.lengths = caches, starts, lengths
        self.span = max(s + n for s, n in zip(starts, lengths))  # S: keys of the longest row

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write each row's new ``key``/``value`` [B, H, T, D] into its cache; return padded [B, H, S, D]."""
        b, h, _, d = key.shape
        keys = key.new_zeros((b, h, self.span, d))
        values = value.new_zeros((b, h, self.span, d))
        for i, (cache, n) in enumerate(zip(self.caches, self.lengths)):
            k_all, v_all = cache.update(key[i : i + 1, :, :n], value[i : i + 1, :, :n], layer_idx)
            keys[i, :, : k_all.shape[2]] = k_all[0]
            values[i, :, : v_all.shape[2]] = v_all[0]
        return keys, values

    def mask(self, width: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Row i, query j sees keys 0..start_i + j; padding queries see key 0 only."""
        keys = torch.arange(self.span, device=device)
        allowed = torch.zeros((len(self.caches), width, self.span), dtype=torch.bool, device=device)
        for i, (start, n) in enumerate(zip(self.starts, self.lengths)):
            queries = torch.arange(start, start + n, device=device)
            allowed[i, :n] = keys[None, :] <= queries[:, None]
            allowed[i, n:, 0] = True
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return min(self.starts)

    @property
    def is_compileable(self) -> bool:
        return False


def _causal_mask(start: int, n: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive mask letting query i (at position start + i) see keys 0..start + i."""
    if n == 1:
        return None  # a single query sees every cached key
    keys = torch.arange(start + n, device=device)
    queries = torch.arange(start, start + n, device=device)
    blocked = keys[None, :] > queries[:, None]  # [T, start + T]
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(
        blocked, torch.finfo(dtype).min)[None, None]


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
