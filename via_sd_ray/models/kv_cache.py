"""KV caches: one generation's cache in one tier, and the slot pool a tier replica keeps them in.

A ``KVCache`` is storage [L, k|v, 1, H, T, D] plus ``token_ids``, the tokens its entries
belong to. A forward pass writes only its new tokens' keys and values, in place; rollback
is a shorter length. A tier brings its cache in line with the committed tokens by cropping
to their longest common prefix (rollback) and running the missing tokens in its next
forward pass (catch-up).

A ``KVPool`` is what a serving tier replica allocates once, at start: per layer
[slots, H, max_len, D] keys and values, sized from a byte budget. Each generation's cache is
a view of one slot (``pool.cache(slot)``), so nothing is allocated, grown or copied while
serving, and a batched pass reads every row's slot where it lies. A cache made without a
pool (``KVCache(...)``) owns its storage and grows by doubling (tests, tensor-parallel
mirror ranks, one-off tools).
"""

from __future__ import annotations

import math
import mmap

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
        data: torch.Tensor | None = None,  # a pool slot's storage [L, 2, 1, H, T, D]: fixed capacity
    ):
        self.slots = {layer: slot for slot, layer in enumerate(layer_ids)}
        self.shape = (len(layer_ids), 2, 1, num_kv_heads, capacity, head_dim)  # [L, k|v, B=1, H, T, D]
        self.growable = data is None
        self.data = torch.empty(self.shape, dtype=dtype, device=device) if data is None else data
        self.token_ids: list[int] = []
        self._write_at = 0  # where the forward pass in progress writes
        self.pool: KVPool | None = None  # the pool whose slot ``slot`` this cache is (None: own storage)
        self._views = None  # (data, {layer: (keys, values)}): heads' views of the current storage
        self.slot = -1

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
            if not self.growable:
                raise ValueError(f"sequence of {need} tokens exceeds the KV slot of {self.capacity} tokens "
                                 "(serving.kv_slot_tokens)")
            capacity = max(need, 2 * self.capacity)
            grown = torch.empty((*self.shape[:4], capacity, self.shape[5]), dtype=self.data.dtype,
                                device=self.data.device)
            grown[:, :, :, :, : len(self.token_ids)] = self.data[:, :, :, :, : len(self.token_ids)]
            self.data = grown
        self._write_at = len(self.token_ids)
        return self._write_at

    def heads(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's whole key and value storage, [H, capacity, D] each (views: a pass writes into them; made
        once per storage)."""
        if self._views is None or self._views[0] is not self.data:
            self._views = (self.data, {layer: (self.data[slot, 0, 0], self.data[slot, 1, 0])
                                       for layer, slot in self.slots.items()})
        return self._views[1][layer_idx]

    def finish(self, token_ids: list[int]) -> None:
        """Record the tokens of the pass that just ran."""
        assert len(self.token_ids) == self._write_at
        self.token_ids.extend(token_ids)

    def fill(self, start: int, token_ids: list[int]) -> None:
        """Name the tokens at positions ``start``.. that a pass recorded as unknown (picked on the device);
        past the cache's length (cropped since) they are dropped."""
        end = min(start + len(token_ids), len(self.token_ids))
        self.token_ids[start:end] = token_ids[: end - start]

    def copy_prefix(self, source: KVCache, length: int) -> None:
        """Start as ``source``'s first ``length`` tokens (prefix reuse): a copy of their entries."""
        assert len(self) == 0 and length <= len(source) and length <= self.capacity
        self.data[:, :, :, :, :length] = source.data[:, :, :, :, :length]
        self.token_ids = list(source.token_ids[:length])


class KVPool:
    """Preallocated slots of one decoder stack's KV entries: per layer [slots, H, max_len, D] keys and values."""

    def __init__(self, layer_ids: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, slots: int, slot_tokens: int):
        assert slots >= 1 and slot_tokens >= 1
        self.layer_ids = list(layer_ids)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.slot_tokens = slot_tokens
        # zeros, not empty: a compiled pass attends over whole slots under a mask, and a masked NaN of
        # uninitialized memory would still poison its row (0 * NaN)
        shape = (len(layer_ids), 2, slots, num_kv_heads, slot_tokens, head_dim)  # [L, k|v, slots, H, T, D]
        cpu = torch.device(device).type == "cpu"
        self.data = zero_pages(shape, dtype) if cpu else torch.zeros(shape, dtype=dtype, device=device)

    @property
    def slots(self) -> int:
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def cache(self, slot: int) -> KVCache:
        """An empty cache over slot ``slot`` (its storage is the pool's: [L, 2, 1, H, T, D])."""
        cache = KVCache(self.layer_ids, self.num_kv_heads, self.head_dim, self.data.dtype, self.data.device,
                        self.slot_tokens, data=self.data[:, :, slot : slot + 1])
        cache.pool, cache.slot = self, slot
        return cache

    def describe(self) -> str:
        return f"{self.slots} slots x {self.slot_tokens} tokens ({self.nbytes / 2**20:.0f} MiB)"


def zero_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor in anonymous memory pages, which the kernel backs on first write: a CPU pool becomes
    resident as its slots fill, not whole at start (``torch.zeros`` writes every byte). Its budget is reserved
    all the same (slots admit generations); a GPU pool is allocated whole."""
    count = math.prod(shape)
    pages = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)  # the tensor keeps the mapping alive


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """KV bytes one token takes in a stack of ``num_layers`` layers."""
    return num_layers * 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU): timers that stop without it measure
    the launches, not the work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device | str, repeat: int) -> float:
    """Median seconds of ``repeat`` runs of ``fn`` after one warm-up run, each synchronized with ``device``."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_device_bytes(device: torch.device | str, share: float | None = None) -> int:
    """Memory free on ``device`` now: the GPU's (``torch.cuda.mem_get_info``), or the host's available RAM.
    ``share``: this process may use that share of the GPU's memory (replicas sharing a GPU), so what is
    free to it is its share less what it holds already (its weights), whatever the others took first."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if share is not None and share < 1:
            free = min(free, max(0, int(share * total) - torch.cuda.memory_reserved(device)))
        return free
    import psutil

    return psutil.virtual_memory().available
