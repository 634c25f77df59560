"""The KV cache of the decoders: keys and values of every layer, preallocated, in the padded (B, ..., S) layout.

It owns its length: each layer writes its new keys and values at explicit positions (`write(layer, k, v, at)`,
where `at` is the cache's `length` when the forward began) and reads back everything up to them. `length` is what
every layer holds, so it moves on once the last layer of a forward has written, and a forward that failed part way
is simply written again. The capacity is checked on every write, packed prefill or padded step alike.
"""
from __future__ import annotations

import torch

from ..errors import InputError


class KVCache:
    """(layers, B, Hkv, capacity, D) for keys and for values."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        self.k = torch.zeros(layers, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.filled = [0] * layers                 # positions each layer holds

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> "KVCache":
        cfg, p = model.config, model.embed.weight
        return cls(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim, p.dtype, p.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def length(self) -> int:
        """Positions cached by every layer: where the next forward's tokens go."""
        return min(self.filled, default=0)

    def write(self, layer: int, k, v, at: int, packing=None):
        """Store k, v (B, Hkv, S, D) at positions at .. at + S and return the keys and values to attend over,
        (B, Hkv, at + S, D). A packed prefill passes (1, Hkv, T, D) with its packing: the cache gets the padded
        layout, and the prefill attends over its own packed tokens."""
        new = k.shape[2] if packing is None else packing.seq
        end = at + new
        if end > self.capacity:
            raise InputError(f"the KV cache holds {self.capacity} positions; this step needs {end} "
                             f"({at} cached + {new} new): make a larger cache")
        if packing is not None:
            for cache, t in ((self.k, k), (self.v, v)):
                cache[layer, :, :, at:end] = packing.unpack(t.transpose(1, 2)).transpose(1, 2)   # (B, Hkv, S, D)
            self.filled[layer] = end
            return k, v
        self.k[layer, :, :, at:end] = k
        self.v[layer, :, :, at:end] = v
        self.filled[layer] = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
