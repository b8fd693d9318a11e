"""A decoder stack's forward pass as one compiled graph over its KV pool (``compile: on``).

The eager pass (``DecoderStack.forward_batch``) drives transformers' layer modules one call at a
time and packs ragged rows; at batch 1 on a GPU, and on a CPU with a small model, its cost is
the launches and the Python between them, not the arithmetic. Here a pass is a rectangle of
tensors, as in gpt-fast:

    ids, positions  [B, T]  the rows' tokens and where they go in their slots
    slots           [B]     each row's KV pool slot

and the whole stack (embedding, every layer, norm, LM head) is one function of them that
``torch.compile`` turns into a single graph. Keys and values are written into the pool where
they belong (an ``index_put_`` on the pool tensor itself, so nothing is copied), and each row
attends to its whole slot under a mask ``key position <= query position``: what lies past a
row's tokens (a shorter cache, an earlier generation's leftovers, a pad) is never read.

B and T are dynamic, so a few compilations (warm-up) cover every (B, T): torch specializes sizes
1 (a decode step, a single row), four graphs at most. On CUDA the graph runs as CUDA graphs
(``mode="reduce-overhead"``, one recording per shape): T is padded to a bucket to bound them.
Rows shorter than the pass's T are padded with tokens after their own, at positions no query
of theirs reads and a later pass overwrites. Passes longer than ``max_tokens`` (prefill) run
eagerly.
"""

from __future__ import annotations

import time
import types

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from via_sd_ray.errors import ConfigError

T_BUCKETS = (1, 2, 4, 8, 16, 32)  # tokens per row of a compiled pass, on CUDA (bounds the CUDA graphs)


def host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as a long tensor on ``device``. To a GPU: through page-locked memory, a copy queued on the
    stream that returns at once (a copy from pageable memory waits for everything queued before it)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def unsupported(stack) -> str | None:
    """Why ``stack`` cannot run compiled (None: it can)."""
    if getattr(stack, "mirrored", False) or stack.num_kv_heads != stack.config.num_key_value_heads:
        return "tensor-parallel stacks run eagerly"
    if getattr(stack.config, "use_sliding_window", False):
        return "sliding-window attention is not compiled"
    if any(type(m).__module__.startswith("deepspeed") for m in stack.layers.modules()):
        return "engine deepspeed runs eagerly"
    return None


class CompiledStep:
    """The compiled forward of one stack over one KV pool."""

    def __init__(self, stack, pool, max_tokens: int = 32):
        reason = unsupported(stack)
        if reason:
            raise ConfigError(f"models.*.compile: expected a stack that can be compiled, received one where {reason}")
        self.stack, self.pool = stack, pool
        self.device = stack.device
        self.max_tokens = max_tokens
        self.cuda = self.device.type == "cuda"
        self.layers = list(stack.layers)
        self.heads = stack.config.num_attention_heads
        if self.cuda:
            torch._dynamo.mark_static_address(pool.data)  # written in place by every replay of a CUDA graph
        self.kv_heads, self.slot_tokens = pool.num_kv_heads, pool.slot_tokens
        # a plain bool (a comparison made inside the graph is a SymBool, which sdpa's enable_gqa refuses)
        self.gqa = int(self.kv_heads) != int(self.heads)
        # dynamic=None: the pool's shapes stay static; B and T become dynamic at their first change (warm-up)
        # a code object of its own: dynamo keeps graphs (and their recompile limit of 8) per code object, and
        # three stacks of one process would otherwise share one cache of up to 12 graphs
        forward = types.FunctionType(CompiledStep._forward.__code__.replace(), globals(), "_forward")
        self.fn = torch.compile(types.MethodType(forward, self), fullgraph=True,
                                 mode="reduce-overhead" if self.cuda else None)
        self.calls = 0
        self.offsets = torch.arange(max(T_BUCKETS[-1], max_tokens), device=self.device)  # a row's token offsets
        self.sync_inputs = False

    def accepts(self, caches, lengths: list[int]) -> bool:
        """Whether a pass of these rows can run compiled: every cache a slot of this pool, each row's
        padded tokens within its slot."""
        width = self.width(max(lengths))
        return (width <= self.max_tokens
                and all(c.pool is self.pool for c in caches)
                and all(len(c) + width <= self.pool.slot_tokens for c in caches))

    def width(self, longest: int) -> int:
        """T of a pass whose longest row has ``longest`` tokens."""
        if not self.cuda:
            return longest
        return next((b for b in T_BUCKETS if b >= longest), longest)

    def run(self, token_lists, caches, starts: list[int], lengths: list[int]) -> torch.Tensor:
        """Logits [B, T, V] (float32) of the rows, written into their slots at ``starts``.

        The pass's host numbers (each row's start and slot, and the ids of rows given as host lists, padded)
        travel in one copy that does not wait for the device (``host_to_device``): a drafter's next pass,
        whose token was picked on the device, is queued while the last one still runs. ``sync_inputs``
        (a measurement's switch) makes each of them a blocking copy of its own instead."""
        width = self.width(max(lengths))
        batch = len(caches)
        host_rows = [i for i, t in enumerate(token_lists) if not isinstance(t, torch.Tensor)]
        numbers = list(starts) + [c.slot for c in caches]
        for i in host_rows:
            numbers += list(token_lists[i]) + [0] * (width - lengths[i])
        if self.sync_inputs:
            numbers = torch.tensor(numbers, dtype=torch.long, device=self.device)
        else:
            numbers = host_to_device(numbers, self.device)
        positions = numbers[:batch, None] + self.offsets[:width][None]  # [B, T]
        slots = numbers[batch : 2 * batch]
        host_ids = numbers[2 * batch :].view(len(host_rows), width)
        if len(host_rows) == batch:
            ids = host_ids
        else:  # rows already on the device (a token just picked there), padded there
            at = {row: j for j, row in enumerate(host_rows)}
            rows = [host_ids[at[i]] if i in at else
                    (t if lengths[i] == width else torch.cat([t, t.new_zeros(width - lengths[i])]))
                    for i, t in enumerate(token_lists)]
            ids = torch.stack(rows)  # [B, T]
        self.calls += 1
        return self.fn(ids, positions, slots, self.pool.data)

    def warm_up(self, max_rows: int) -> float:
        """Compile (and on CUDA record) the shapes serving will see, so the first request pays nothing:
        rows 1 and ``max_rows``, tokens per row 1 and a few; returns the seconds it took."""
        start = time.perf_counter()
        rows = sorted({1, min(2, max_rows), max_rows})
        widths = T_BUCKETS if self.cuda else (1, 2)
        for b in rows:
            for t in widths:
                if t > self.max_tokens or b > self.pool.slots or t > self.pool.slot_tokens:
                    continue
                with torch.inference_mode():  # as forward_batch runs it (guards see inference tensors)
                    ids = torch.zeros((b, t), dtype=torch.long, device=self.device)
                    positions = torch.arange(t, device=self.device)[None].repeat(b, 1)
                    slots = torch.arange(b, device=self.device)
                    self.fn(ids, positions, slots, self.pool.data)  # writes at slot starts: no cache holds them yet
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 kv: torch.Tensor) -> torch.Tensor:
        stack = self.stack
        batch, width = ids.shape
        hidden = stack.embed_tokens(ids)  # [B, T, H]
        cos, sin = stack.rotary_emb(hidden, position_ids=positions)
        keys_at = torch.arange(self.slot_tokens, device=ids.device)
        mask = (keys_at[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, S]
        kv_heads = self.kv_heads
        # index_put_ indices into the pool [L, k|v, slots, H, S, D], each [B, T, Hkv]
        rows = slots[:, None, None].expand(batch, width, kv_heads)
        heads = torch.arange(kv_heads, device=ids.device)[None, None].expand(batch, width, kv_heads)
        at = positions[:, :, None].expand(batch, width, kv_heads)
        is_key, is_value = torch.zeros_like(rows), torch.ones_like(rows)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, width, -1, stack.head_dim)
            k = attn.k_proj(x).view(batch, width, -1, stack.head_dim)
            v = attn.v_proj(x).view(batch, width, -1, stack.head_dim)
            if getattr(attn, "q_norm", None) is not None:  # qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            layer_at = torch.full_like(rows, index)
            kv.index_put_((layer_at, is_key, rows, heads, at), k.transpose(1, 2))
            kv.index_put_((layer_at, is_value, rows, heads, at), v)
            out = F.scaled_dot_product_attention(q, kv[index, 0][slots], kv[index, 1][slots], attn_mask=mask,
                                                 scale=attn.scaling, enable_gqa=self.gqa)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, width, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return stack.lm_head(stack.norm(hidden)).float()
