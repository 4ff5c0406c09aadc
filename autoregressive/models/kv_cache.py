"""A key/value cache preallocated for the whole sequence and written in place.

Allocated once per generation call (`KVCache(...)` or `Transformer.new_cache(...)`; the fast
decoding path keeps it across calls) and passed explicitly to `prefill` / `decode_step`; it is
never attached to a model. Every layer owns two tensors (keys, values) of shape `(B, H_kv, L, hd)`.
A step writes the keys and values of its G new elements at G cache slots (an indexed write, no
`torch.cat`), so a step may carry one token (raster), a group of tokens (PAR, LPD) or tokens for
arbitrary grid cells (ARPG: the slot is the generation step, the 2-D position travels separately in
the RoPE rows). A step attends over a prefix of the cache, `cache.upto(written)`: the slots written
so far rounded up to one of a few lengths, with a boolean mask over that prefix hiding what it may
not see. Shapes stay static within a bucket (CUDA-graph friendly, as in the official
`setup_caches`), and early steps do not read the empty end of the cache. Cache lengths and bucket
lengths are multiples of `SDPA_ALIGN` (the official FoundationVision/LlamaGen
`autoregressive/models/gpt.py` `setup_caches` rounds its cache up to a multiple of 8): the fused
attention kernels want the key length, hence the rows of an attention mask over it, 8-aligned.
"""
from __future__ import annotations

import torch

#: Key lengths, mask rows and head dims are padded to a multiple of this many elements: the
#: memory-efficient and flash attention kernels need it (otherwise SDPA pads the mask on every
#: call, or falls back to the math kernel).
SDPA_ALIGN = 8


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n (n >= 0). Plain arithmetic, no branch: on symbolic
    sizes under `torch.compile` it adds no guard."""
    return -(-n // k) * k


class LayerKVCache:
    """The cache of one attention layer: views `k`, `v` of shape (B, H_kv, L, hd)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k
        self.v = v

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` (B, H_kv, G, hd) at the G slots `pos` (LongTensor (G,)), in place.

        Returns the whole cache of this layer, keys and values (B, H_kv, L, hd), for attention.
        Only the first B rows of the cache are used when the step carries a smaller batch.
        """
        b = k.shape[0]
        k_all, v_all = self.k[:b], self.v[:b]  # (B, H_kv, L, hd) views of the preallocated storage
        # An indexed assignment (not `index_copy_`): torch.compile turns it back into an in-place
        # write of the G slots instead of copying the whole cache.
        k_all[:, :, pos] = k.to(k_all.dtype)
        v_all[:, :, pos] = v.to(v_all.dtype)
        return k_all, v_all


#: Lengths a step's attention may read: the written slots rounded up to one of this many prefixes.
VISIBLE_BUCKETS = 8


def visible_slots(written: int, max_len: int, buckets: int = VISIBLE_BUCKETS) -> int:
    """The leading slots a step reads once `written` slots hold keys: `written` rounded up to a
    multiple of ceil(max_len / buckets) rounded up to `SDPA_ALIGN`, at most max_len. Reading a
    prefix instead of the whole cache saves bandwidth early in the sequence; the few lengths keep
    the number of distinct step shapes (one CUDA graph each) small; every length is a multiple of
    `SDPA_ALIGN` when max_len is (as every `KVCache`'s is)."""
    if not 0 < written <= max_len:
        raise ValueError(f"{written} written slots for a cache of {max_len}")
    step = find_multiple(-(-max_len // buckets), SDPA_ALIGN)
    return min(max_len, find_multiple(written, step))


class KVCache:
    """Keys and values of every layer for up to `max_len` sequence slots and `batch_size` rows.

    Args:
        n_layer: number of attention layers that cache (one slice each).
        batch_size: rows (e.g. 2B when the two CFG halves run in one batch).
        n_kv_head, head_dim: key/value heads and their width.
        max_len: number of slots needed; slot t holds sequence element t. The cache holds L =
            max_len rounded up to a multiple of `SDPA_ALIGN` (`self.max_len`); the extra slots are
            never written, and every mask over the cache hides them (they lie after every position).
        dtype, device: of the storage (normally those of the model weights).
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str):
        length = find_multiple(max_len, SDPA_ALIGN)
        shape = (batch_size, n_kv_head, length + SDPA_ALIGN, head_dim)
        # One tensor per layer, not views of one: a compiled step then sees inputs that do not
        # alias each other, and writes each layer's slots in place. Each is the first `length`
        # slots of a storage one `SDPA_ALIGN` longer, so the whole cache has the strides of every
        # prefix `upto` gives (never contiguous): a compiled step guards on contiguity and would
        # otherwise need another graph for the last bucket.
        self._layers = [LayerKVCache(torch.zeros(shape, dtype=dtype, device=device)[:, :, :length],
                                     torch.zeros(shape, dtype=dtype, device=device)[:, :, :length])
                        for _ in range(n_layer)]
        self._prefixes: dict[int, KVCache] = {}

    def upto(self, written: int) -> "KVCache":
        """This cache as a step sees it once `written` slots are filled: its first
        `visible_slots(written, max_len)` slots, a cache of that length whose tensors are views of
        these (writes land here). Masks built from its `max_len` are as wide. The same object is
        returned for the same length, so a captured step that keeps it stays valid."""
        n = visible_slots(written, self.max_len)
        if n == self.max_len:
            return self
        if n not in self._prefixes:
            view = KVCache.__new__(KVCache)
            view._layers = [LayerKVCache(c.k[:, :, :n], c.v[:, :, :n]) for c in self._layers]
            view._prefixes = {}
            self._prefixes[n] = view
        return self._prefixes[n]

    def tensors(self) -> list[torch.Tensor]:
        """Keys and values of every layer (what a compiled step reads and writes)."""
        return [t for c in self._layers for t in (c.k, c.v)]

    @property
    def batch_size(self) -> int:
        return self._layers[0].k.shape[0]

    @property
    def max_len(self) -> int:
        return self._layers[0].k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values together (what a step attending over this cache reads)."""
        return sum(2 * c.k.numel() * c.k.element_size() for c in self._layers)

    def layer(self, i: int) -> LayerKVCache:
        return self._layers[i]

    def causal_mask(self, pos: torch.Tensor) -> torch.Tensor:
        """Boolean mask (G, L), True = attend: the element at slot `pos[g]` sees slots <= pos[g].

        This is the official `causal_mask[:, input_pos]` row selection; slots not written yet are
        always later than every current position, so they stay invisible.
        """
        slots = torch.arange(self.max_len, device=pos.device)
        return slots[None, :] <= pos[:, None]  # (G, L)
