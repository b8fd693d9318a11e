"""The KV cache of one generation in one tier.

Storage is one preallocated tensor that grows by doubling, so appending a block is a
copy into place (no concatenation per step) and rollback is just a shorter length.
``token_ids`` records which tokens the cached entries belong to: a tier brings its cache
in line with the committed tokens by cropping to their longest common prefix (rollback)
and running the missing tokens in its next forward pass (catch-up).

It answers the one method transformers' attention modules call on a cache,
``update(key, value, layer_idx)``, so the decoder layers of a Hugging Face model can
write into it directly.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        layer_ids: list[int],  # the attention modules' layer_idx, in stack order
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 256,
    ):
        self.slots = {layer: slot for slot, layer in enumerate(layer_ids)}
        self.shape = (len(layer_ids), 2, 1, num_kv_heads, capacity, head_dim)  # [L, k|v, B=1, H, T, D]
        self.data = torch.empty(self.shape, dtype=dtype, device=device)
        self.token_ids: list[int] = []
        self._write_at = 0  # where the forward pass in progress writes

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def capacity(self) -> int:
        return self.data.shape[4]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def common_prefix(self, ids: list[int]) -> int:
        n, cached = 0, self.token_ids
        limit = min(len(cached), len(ids))
        while n < limit and cached[n] == ids[n]:
            n += 1
        return n

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` tokens."""
        assert 0 <= length <= len(self.token_ids)
        del self.token_ids[length:]

    def begin(self, new_tokens: int) -> int:
        """Prepare a forward pass over ``new_tokens`` tokens; returns their first position."""
        need = len(self.token_ids) + new_tokens
        if need > self.capacity:
            capacity = max(need, 2 * self.capacity)
            grown = torch.empty((*self.shape[:4], capacity, self.shape[5]), dtype=self.data.dtype,
                                device=self.data.device)
            grown[:, :, :, :, : len(self.token_ids)] = self.data[:, :, :, :, : len(self.token_ids)]
            self.data = grown
        self._write_at = len(self.token_ids)
        return self._write_at

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write ``key``/``value`` [1, H, T, D] of the pass in progress; return all keys/values so far."""
        slot = self.slots[layer_idx]
        end = self._write_at + key.shape[2]
        self.data[slot, 0, :, :, self._write_at : end] = key
        self.data[slot, 1, :, :, self._write_at : end] = value
        return self.data[slot, 0, :, :, :end], self.data[slot, 1, :, :, :end]

    def finish(self, token_ids: list[int]) -> None:
        """Record the tokens of the pass that just ran."""
        assert len(self.token_ids) == self._write_at
        self.token_ids.extend(token_ids)

    # transformers asks a cache for these in a few code paths; answer consistently.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._write_at

    @property
    def is_compileable(self) -> bool:
        return False
