"""The KV cache of the decoders (OPT, Llama): keys and values of every layer, preallocated, in the padded layout.

Protocol, owned here: each layer calls `update(layer, k, v, packing)` with its new keys and values and attends over
what it returns; after the last layer the model calls `advance(n)` once: the n new positions are then cached.
"""
from __future__ import annotations

import torch

from ..errors import InputError


class KVCache:
    """(layers, B, Hkv, max_len, D) for keys and for values; `length` positions filled."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(layers, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        cfg, p = model.config, model.embed.weight
        return cls(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, p.dtype, p.device)

    def update(self, layer: int, k, v, packing=None):
        """Store this step's k, v (B, Hkv, S, D) at positions length.. and return the keys and values to attend
        over: (B, Hkv, length + S, D). A packed prefill passes (1, Hkv, T, D) with its packing: the cache
        gets the padded layout, and the prefill attends over its own packed tokens."""
        start = self.length
        if packing is not None:
            for cache, new in ((self.k, k), (self.v, v)):
                padded = packing.unpack(new.transpose(1, 2)).transpose(1, 2)                  # (B, Hkv, S, D)
                cache[layer, :, :, start:start + padded.shape[2]] = padded
            return k, v
        end = start + k.shape[2]
        if end > self.k.shape[3]:
            raise InputError(f"the KV cache holds {self.k.shape[3]} positions; this step needs {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """The n positions written by this forward's layers are now part of the cache."""
        self.length += n
