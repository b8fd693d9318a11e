"""A decoder stack over the modules of a Hugging Face causal LM: embed, a chosen list of
decoder layers, final norm, LM head.

The full verifier is the stack of all layers; the slim verifier is the same model with a
subset of them (same weights, embeddings, norm and head). Driving the layers ourselves,
instead of calling the model's ``forward``, lets each stack write into its own
``KVCache``, skip layers, and compute the LM head only on the positions it needs: the
catch-up tokens of a verifier pass need KV entries but no logits.

A pass over several generations packs their rows into one sequence [N = sum(T_i), H] (no row pads
another). Each layer runs as a short function of its modules' weights (``layers.LayerPlan``), not
through transformers' layer ``forward``: that costs ~3x the arithmetic of a small model's pass in
Python (a 2-layer test model: 1.05 ms against 0.35 ms), which is what a GPU at batch 1 pays in
launches. Attention writes each row's new keys and values into its own cache (a KV pool slot) and
attends row by row over views of it (``PackedRows``). On CPUs a model of packed layers runs all its layers
in one C++ op instead (``decoder_layers`` in csrc/qmm.cpp: the plans' ops, in their order, bit for bit),
so no Python runs between them (~15 % of the 0.5B drafter's step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from via_sd_ray.core.sampling import as_float32
from via_sd_ray.errors import ConfigError
from via_sd_ray.models import qmm
from via_sd_ray.models.kv_cache import KVCache, KVPool
from via_sd_ray.models.layers import LayerPlan, Norm, RotaryTable, cheapest, out_width, rotate
from via_sd_ray.models.quant import PackedLinear, SwiGLU, fuse_projections
from via_sd_ray.models.step import CompiledStep

# Architectures whose decoder layers take (hidden, attention_mask, position_ids,
# past_key_values, position_embeddings) and whose model adds nothing between them.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class DecoderStack(nn.Module):
    def __init__(self, lm: nn.Module, layers: list[int] | None = None, num_kv_heads: int | None = None,
                 fuse: bool = True):
        """``num_kv_heads``: the KV heads this process computes, when tensor parallelism gives it a share of
        them (None: all of the model's). ``fuse``: merge each layer's q / k / v and gate / up projections into
        one call each (``quant.fuse_projections``; in place, on the model, once: stacks sharing a model share
        it; tensor-parallel layers are left alone)."""
        super().__init__()
        config = lm.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model: expected an architecture in {SUPPORTED_MODEL_TYPES}, received {config.model_type!r}"
            )
        if fuse:
            fuse_projections(lm)
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
        # rotary embedding, cache writes, attention of short rows and norms as C++ ops (models/qmm.py), where
        # they run
        self.fused_cpu_ops = self.device.type == "cpu" and qmm.available() is None
        self.rotary = RotaryTable(self.rotary_emb)
        self.final_norm = Norm(self.norm)
        self.plans: list[LayerPlan] | None = None
        self.native: NativeLayers | None = None  # qmm's decoder_layers arguments, where it computes the layers
        self.head = None  # the LM head as its cheapest callable (with the plans)

    @property
    def dtype(self) -> torch.dtype:
        # the final norm's: an input embedding may hold its table narrower (loading.narrow_embedding)
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def vocab_size(self) -> int:
        # a tensor-parallel head (DeepSpeed's LmHeadLinearAllreduce) has no out_features: its weight is [V, H / tp]
        return out_width(self.lm_head)

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
            positions = range(starts[0], starts[0] + lengths[0])
        else:
            ids = torch.cat([t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.long, device=device)
                             for t in token_lists])  # [N]: the rows packed
            positions = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths)])
        hidden = self.embed_tokens(ids)  # [N, H]
        cos, sin = self.rotary.at(positions, longest, hidden)  # [N, D] each
        packed = PackedRows(caches, starts, lengths, device, self.fused_cpu_ops)
        if self.plans is None:  # each layer's callables, looked up once (after any quantization or fusion)
            self.plans = [LayerPlan(layer, self.head_dim) for layer in self.layers]
            self.head = cheapest(self.lm_head)
            native = self.fused_cpu_ops and self.dtype in (torch.bfloat16, torch.float32)
            self.native = native_layers(self.layers, self.plans, self.head_dim) if native else None
        if self.native is not None:
            # the layers in one C++ op (csrc/qmm.cpp decoder_layers): what the plans compute, op for op
            heads = [cache.heads(layer) for layer in self.layer_ids for cache in caches]
            weights, dims, scale, eps = self.native.arguments()
            hidden, residual = torch.ops.via_sd.decoder_layers(
                hidden, weights, dims, [h[0] for h in heads], [h[1] for h in heads], starts, lengths, cos, sin,
                scale, eps, self.head_dim)
        else:
            residual = None  # each layer's last output, added into the residual stream by the next norm
            for plan in self.plans:
                hidden, residual = plan(hidden, residual, cos, sin, packed)
        _finish(caches, token_lists)
        wanted = [off + n - k + j for off, n, k in zip(packed.offsets, lengths, num_logits) for j in range(k)]
        if not wanted:
            return [hidden.new_empty((0, self.vocab_size), dtype=torch.float32) for _ in lengths]
        if wanted == list(range(len(hidden) - len(wanted), len(hidden))):
            at = slice(len(hidden) - len(wanted), None)
        else:
            at = torch.tensor(wanted, device=device)
        # the last layer's output added into the rows by the norm, as every layer's input norm adds its own
        logits = self.head(self.final_norm(hidden[at], self.fused_cpu_ops, None if residual is None else residual[at]))
        logits = as_float32(logits)  # [sum(num_logits), V]
        return list(torch.split(logits, num_logits)) if len(num_logits) > 1 else [logits]


class NativeLayers:
    """The arguments of ``qmm``'s ``decoder_layers`` for a stack's layers (``native_layers``): the weights, and
    per layer the 22 dims csrc/qmm.cpp reads (n, bits, group, int8 of q/k/v, o, SwiGLU, down; the q and k widths;
    n, bits, group, int8 of v's own projection, or zeros)."""

    def __init__(self, weights: list[torch.Tensor], layers: list[tuple], scale: float, eps: float):
        self.weights, self.scale, self.eps = weights, scale, eps
        self.layers = layers  # per layer: (q/k/v, o, SwiGLU, down, v or None, (q width, k width))
        self.linears = [linear for layer in layers for linear in layer[:5]]
        self.int8: list[bool] = []
        self.dims: list[int] = []

    def arguments(self) -> tuple[list[torch.Tensor], list[int], float, float]:
        # ``round_activations`` may switch a projection's int8 at any time: the dims follow
        int8 = [linear is not None and linear.int8 for linear in self.linears]
        if int8 != self.int8:
            self.int8 = int8
            self.dims = [d for qkv, o, swiglu, down, v, widths in self.layers
                         for d in (*_dims(qkv), *_dims(o), *_dims(swiglu), *_dims(down), *widths, *_dims(v))]
        return self.weights, self.dims, self.scale, self.eps


def _dims(linear: nn.Module | None) -> tuple[int, int, int, int]:
    """A packed projection's n, bits, group and int8 as ``decoder_layers`` reads them (zeros: no projection)."""
    if linear is None:
        return 0, 0, 0, 0
    n = 2 * linear.out_features if isinstance(linear, SwiGLU) else linear.out_features
    return n, linear.bits, linear.group, int(linear.int8)


def native_layers(layers: nn.ModuleList, plans: list[LayerPlan], head_dim: int) -> NativeLayers | None:
    """``qmm``'s ``decoder_layers`` arguments for these layers, or None where a layer is not of the form it
    computes: q / k / v (or q / k, v apart) fused in one packed projection (biases allowed), packed o and down
    without bias, a packed SwiGLU, no q / k norms, one attention scale and one norm eps."""
    weights: list[torch.Tensor] = []
    parts_of: list[tuple] = []
    scales, eps = set(), set()
    for layer, plan in zip(layers, plans):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, o = getattr(attn, "via_qkv", None), attn.o_proj
        swiglu, down = getattr(mlp, "via_swiglu", None), mlp.down_proj
        parts = getattr(attn, "via_qkv_parts", 0)
        v = None if parts == 3 else attn.v_proj
        if not (type(qkv) is PackedLinear and parts in (2, 3) and (v is None or type(v) is PackedLinear)
                and type(o) is PackedLinear and type(swiglu) is SwiGLU and type(down) is PackedLinear
                and o.bias is None and down.bias is None and plan.q_norm is None and plan.k_norm is None):
            return None
        scales.add(plan.scaling or head_dim**-0.5)
        eps.update((plan.input_norm.eps, plan.post_norm.eps))
        empty = qkv.codes.new_empty(0)
        weights += [plan.input_norm.weight, plan.post_norm.weight, qkv.codes, qkv.meta,
                    empty if qkv.bias is None else qkv.bias, o.codes, o.meta, swiglu.codes, swiglu.meta,
                    down.codes, down.meta]
        weights += [empty, empty, empty] if v is None else [v.codes, v.meta, empty if v.bias is None else v.bias]
        parts_of.append((qkv, o, swiglu, down, v, tuple(plan.widths[:2])))
    if len(scales) != 1 or len(eps) != 1:
        return None
    return NativeLayers(weights, parts_of, scales.pop(), eps.pop())


def _finish(caches: list[KVCache], token_lists: list) -> None:
    """Record each row's tokens in its cache (a device row's as unknown, -1, until ``KVCache.fill``)."""
    for cache, tokens in zip(caches, token_lists):
        cache.finish([-1] * len(tokens) if isinstance(tokens, torch.Tensor) else tokens)


SHORT_ROW = 32  # rows of at most this many tokens (decode steps, verify blocks, held via-sd blocks) attend per query


class PackedRows:
    """The caches of a packed pass.

    ``attend`` rotates each row's new queries and keys, writes its keys and values into its own cache (the
    only copy a pass makes), and runs attention row by row over views of each row's cache, with a mask
    only where a row has several queries (at most [T_row, start + T_row]). ``fused``: each row rotates and
    writes in one C++ op and attends query by query in another (``qmm.rope_write``, ``qmm.attend_short``), so
    a query's result never depends on how its rows were cut."""

    def __init__(self, caches: list[KVCache], starts: list[int], lengths: list[int], device, fused: bool = False):
        self.caches, self.starts, self.lengths, self.fused = caches, starts, lengths, fused
        self.offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        # [T, S]: keys each query sees (long rows, for sdpa) or does not see (short rows, for masked_fill)
        self.masks = [None if n == 1 or fused else
                      torch.ones((n, s + n), dtype=torch.bool, device=device).tril(diagonal=s) ^ (n <= SHORT_ROW)
                      for s, n in zip(starts, lengths)]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention of the packed rows' queries ``q`` [N, Hq, D] over their caches, once their keys and values
        ``k``, ``v`` [N, Hkv, D] are written there (``cos``, ``sin`` [N, D]: the rows' rotary embedding);
        returns [N, Hq * D]."""
        heads, d = q.shape[1], q.shape[2]
        scale = scaling or d**-0.5
        outs = []
        for cache, start, n, off, mask in zip(self.caches, self.starts, self.lengths, self.offsets, self.masks):
            rows = slice(off, off + n)
            keys, values = cache.heads(layer_idx)  # [Hkv, C, D] each: the row's cache
            if self.fused:  # every row, long ones too: each query computed alike however rows are cut (prefix reuse,
                # chunked prefill, batching), so those never change a token
                grouped = qmm.rope_write(q[rows], k[rows], v[rows], keys, values, start, cos[rows], sin[rows], scale)
                outs.append(qmm.attend_short(grouped, keys, values, start, n))
                continue
            query = rotate(q[rows].transpose(0, 1), cos[rows], sin[rows])  # [Hq, T, D]
            keys[:, start : start + n] = rotate(k[rows].transpose(0, 1), cos[rows], sin[rows])
            values[:, start : start + n] = v[rows].transpose(0, 1)
            keys, values = keys[:, : start + n], values[:, : start + n]
            if n <= SHORT_ROW:
                grouped = (query * scale).reshape(keys.shape[0], -1, d)
                outs.append(_short_attention(grouped, keys, values, mask, heads))
            else:
                out = F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask, scale=scale,
                                                     enable_gqa=keys.shape[0] != heads)  # [1, Hq, T, D]
                outs.append(out[0].transpose(0, 1).reshape(n, heads * d))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _short_attention(grouped: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocked: torch.Tensor | None,
                     heads: int) -> torch.Tensor:
    """Attention of a few scaled, rotated queries ``grouped`` [Hkv, g * T, D] (each KV head's query heads
    stacked) over one cache's ``keys`` and ``values`` [Hkv, S, D] as two batched matmuls per KV head (no copy
    of the cache for GQA), the softmax in float32 (or float64); ``blocked`` [T, S]: keys a query does not see.
    Returns [T, Hq * D]. On CPUs torch's fused kernel spends ~0.6 ms on one query over 300 keys (it
    parallelises over queries), these matmuls ~0.1 ms: the attention of a decode step."""
    kv_heads, rows, d = grouped.shape
    t, s = rows * kv_heads // heads, keys.shape[1]
    scores = torch.bmm(grouped, keys.transpose(1, 2))  # [Hkv, g * T, S]
    if blocked is not None:
        scores = scores.view(kv_heads, -1, t, s).masked_fill(blocked, float("-inf")).view(kv_heads, -1, s)
    probs = torch.softmax(scores, -1, dtype=torch.promote_types(scores.dtype, torch.float32))
    out = torch.bmm(probs.to(values.dtype), values)  # [Hkv, g * T, D]
    return out.view(heads, t, d).transpose(0, 1).reshape(t, heads * d)


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
