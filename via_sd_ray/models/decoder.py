"""A decoder stack over the modules of a Hugging Face causal LM: embed, a chosen list of
decoder layers, final norm, LM head.

The full verifier is the stack of all layers; the slim verifier is the same model with a
subset of them (same weights, embeddings, norm and head). Driving the layers ourselves,
instead of calling the model's ``forward``, lets each stack write into its own
``KVCache``, skip layers, and compute the LM head only on the positions it needs: the
catch-up tokens of a verifier pass need KV entries but no logits.

A pass over several generations packs their rows into one sequence [N = sum(T_i), H] (no row pads
another). Each layer runs as a short function of its modules' weights (``_layer``: the
projections, MLP and norms as the model's own modules, rotary embedding and residuals as tensor
ops), not through transformers' layer ``forward``: that costs ~3x the arithmetic of a small model's
pass in Python (a 2-layer test model: 1.05 ms against 0.35 ms), which is what a GPU at batch 1 pays
in launches. Attention writes each row's new keys and values into its own cache (a KV pool slot)
and attends row by row over views of it (``PackedRows``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        if len(token_lists) == 1:
            row = token_lists[0]
            ids = row if isinstance(row, torch.Tensor) else torch.tensor(row, dtype=torch.long, device=device)
            positions = torch.arange(starts[0], starts[0] + lengths[0], device=device)
        else:
            ids = torch.cat([t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.long, device=device)
                             for t in token_lists])  # [N]: the rows packed
            positions = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths)])
        hidden = self.embed_tokens(ids)  # [N, H]
        cos, sin = self.rotary_emb(hidden[None], position_ids=positions[None])  # [1, N, D] each
        cos, sin = cos[0], sin[0]
        packed = PackedRows(caches, starts, lengths, device)
        for layer in self.layers:
            hidden = _layer(layer, hidden, cos, sin, packed, self.head_dim)
        _finish(caches, token_lists)
        wanted = [off + n - k + j for off, n, k in zip(packed.offsets, lengths, num_logits) for j in range(k)]
        if not wanted:
            return [hidden.new_empty((0, self.vocab_size), dtype=torch.float32) for _ in lengths]
        rows = hidden[-1:] if wanted == [len(hidden) - 1] else hidden[torch.tensor(wanted, device=device)]
        logits = self.lm_head(_norm(self.norm, rows)).float()  # [sum(num_logits), V]
        return list(torch.split(logits, num_logits)) if len(num_logits) > 1 else [logits]


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module applied to ``x`` as one ``torch.rms_norm`` (the module's own forward is 7 ops): bit
    for bit the module's result in float32, within a rounding of it in bf16 (where the module rounds once
    more, before its weight); float64 (tests) through the module, which computes in float32 there."""
    if x.dtype == torch.float64:
        return norm(x)
    return torch.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [H, N, D] (the half-split convention of these architectures)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _layer(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packed: PackedRows,
           head_dim: int) -> torch.Tensor:
    """One decoder layer over the packed rows ``hidden`` [N, H]; its projections, MLP and norms are the
    model's own modules (quantized, or tensor-parallel ones whose output projections all-reduce)."""
    attn, mlp = layer.self_attn, layer.mlp
    n = hidden.shape[0]
    x = _norm(layer.input_layernorm, hidden)
    q = attn.q_proj(x).view(n, -1, head_dim)  # [N, Hq, D]
    k = attn.k_proj(x).view(n, -1, head_dim)  # [N, Hkv, D]
    v = attn.v_proj(x).view(n, -1, head_dim).transpose(0, 1)  # [Hkv, N, D]
    if getattr(attn, "q_norm", None) is not None:  # qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rotate(q.transpose(0, 1), cos, sin), _rotate(k.transpose(0, 1), cos, sin)
    packed.update(k[None], v[None], attn.layer_idx)
    out = packed.attend(attn.layer_idx, q[None], attn.scaling)  # [1, N, Hq, D]
    hidden = hidden + attn.o_proj(out.reshape(n, -1))
    x = _norm(layer.post_attention_layernorm, hidden)
    return hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _finish(caches: list[KVCache], token_lists: list) -> None:
    """Record each row's tokens in its cache (a device row's as unknown, -1, until ``KVCache.fill``)."""
    for cache, tokens in zip(caches, token_lists):
        cache.finish([-1] * len(tokens) if isinstance(tokens, torch.Tensor) else tokens)


SHORT_ROW = 16  # rows of at most this many tokens (decode steps, verify blocks) attend by grouped matmuls


class PackedRows:
    """The caches of a packed pass.

    ``update`` writes each row's new keys and values into its own cache (the only copy a pass
    makes); ``attend`` then runs attention row by row over views of each row's cache, with a mask
    only where a row's queries start after cached keys (at most [T_row, start + T_row])."""

    def __init__(self, caches: list[KVCache], starts: list[int], lengths: list[int], device):
        self.caches, self.starts, self.lengths = caches, starts, lengths
        self.offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        self.masks = [None if n == 1 else
                      torch.ones((n, s + n), dtype=torch.bool, device=device).tril(diagonal=s)  # [T, S]
                      for s, n in zip(starts, lengths)]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the rows' ``key``/``value`` [1, H, N, D] into their caches."""
        for cache, off, n in zip(self.caches, self.offsets, self.lengths):
            cache.write(layer_idx, key[:, :, off : off + n], value[:, :, off : off + n])
        return key, value

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention of the packed ``query`` [1, Hq, N, D] over each row's cache; returns [1, N, Hq, D]."""
        if len(self.caches) == 1 and self.lengths[0] <= SHORT_ROW:
            keys, values = self.caches[0].layer(layer_idx, self.starts[0] + self.lengths[0])
            return _short_attention(query, keys, values, self.masks[0], scaling)
        out = torch.empty_like(query)
        for cache, start, n, off, mask in zip(self.caches, self.starts, self.lengths, self.offsets, self.masks):
            keys, values = cache.layer(layer_idx, start + n)  # [1, H, S, D] views of the row's cache
            rows = query[:, :, off : off + n]
            if n <= SHORT_ROW:
                out[:, :, off : off + n] = _short_attention(rows, keys, values, mask, scaling).transpose(1, 2)
            else:
                out[:, :, off : off + n] = F.scaled_dot_product_attention(
                    rows, keys, values, attn_mask=mask, scale=scaling, enable_gqa=keys.shape[1] != query.shape[1])
        return out.transpose(1, 2)


def _short_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None) -> torch.Tensor:
    """Attention of a few queries [1, Hq, T, D] over one cache's keys and values [1, Hkv, S, D] as two
    batched matmuls per KV head (each KV head's query heads stacked: no copy of the cache for GQA), the
    softmax in float32 (or float64); returns [1, T, Hq, D]. On CPUs torch's fused kernel spends ~0.6 ms on one query over
    300 keys (it parallelises over queries), these matmuls ~0.1 ms: the attention of a decode step."""
    _, heads, t, d = query.shape
    kv_heads, s = keys.shape[1], keys.shape[2]
    grouped = query[0].reshape(kv_heads, heads // kv_heads * t, d)  # [Hkv, g * T, D]
    scores = torch.bmm(grouped, keys[0].transpose(1, 2))  # [Hkv, g * T, S]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * (scaling or d**-0.5)
    if mask is not None:
        scores = scores.view(kv_heads, -1, t, s).masked_fill(~mask, float("-inf")).view(kv_heads, -1, s)
    out = torch.bmm(scores.softmax(-1).to(values.dtype), values[0])  # [Hkv, g * T, D]
    return out.view(heads, t, d).transpose(0, 1)[None]


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
