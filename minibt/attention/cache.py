"""The KV cache of the decoders: keys and values of every layer, preallocated, in the padded (B, Hkv, S, D) layout.

It owns its length: each layer writes its new keys and values at explicit positions (`write(layer, k, v, at)`,
where `at` is the cache's `length` when the forward began) and reads back what it attends over. `length` is what
every layer holds, so it moves on once the last layer of a forward has written, and a forward that failed part way
is simply written again. The capacity is checked on every write, packed prefill or padded step alike.

A layer with a causal sliding window of W keys (window (W - 1, 0): Mistral, Gemma 2's local layers, gpt-oss) never
looks further back than W - 1 positions, so its cache is a ring of W slots, position p in slot p % W: memory W, not
the whole length, and generation past the window stays exact. It hands back the keys in order, oldest first: the
last min(at, W) cached and the new ones, and the forward's mask reads them as the last keys of the sequence.
"""
from __future__ import annotations

import torch

from ..errors import InputError


def memory_of(device) -> int | None:
    """Total bytes of `device`'s memory (RAM for the CPU), None when unknown: a cache above it can never be made."""
    device = torch.device(device)
    try:
        if device.type == "cpu":
            import os
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


class KVCache:
    """Per layer, keys and values of (B, Hkv, slots, D): `capacity` slots, or W for a layer with a window of W."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device,
                 windows=None):
        windows = list(windows or [None] * layers)
        self.ring = [None if w is None or w[0] is None or w[0] + 1 >= capacity else w[0] + 1 for w in windows]
        slots = [capacity if r is None else r for r in self.ring]
        need = 2 * sum(slots) * batch * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        have = memory_of(device)
        what = (f"a KV cache of {need / 2**30:.1f} GiB ({layers} layers x keys and values x batch {batch} x "
                f"{kv_heads} heads x {max(slots)} positions x head dim {head_dim}, {dtype})")
        if have is not None and need > have:
            raise InputError(f"{what} is more than the device's {have / 2**30:.1f} GiB of memory: lower the batch "
                             "or max_new_tokens")
        try:
            self.k = [torch.zeros(batch, kv_heads, n, head_dim, dtype=dtype, device=device) for n in slots]
            self.v = [torch.zeros_like(t) for t in self.k]
        except (RuntimeError, MemoryError) as e:     # torch.OutOfMemoryError is a RuntimeError
            raise InputError(f"{what} could not be allocated ({str(e).splitlines()[0][:200]}): lower the batch or "
                             "max_new_tokens") from None
        self.capacity = capacity
        self.filled = [0] * layers                 # positions each layer holds

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> "KVCache":
        """A cache for `model`'s layers: each layer's window from its config (`windows()`, None: full attention)."""
        cfg, p = model.config, model.embed.weight
        return cls(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim, p.dtype, p.device,
                   cfg.windows())

    @property
    def length(self) -> int:
        """Positions cached by every layer: where the next forward's tokens go."""
        return min(self.filled, default=0)

    def write(self, layer: int, k, v, at: int, packing=None):
        """Store k, v (B, Hkv, S, D) at positions at .. at + S and return the keys and values to attend over: all
        of them, (B, Hkv, at + S, D), or for a ring the last ones, (B, Hkv, min(at, W) + S, D). A packed prefill
        passes (1, Hkv, T, D) with its packing: the cache gets the padded layout, and the prefill attends over its
        own packed tokens."""
        new = k.shape[2] if packing is None else packing.seq
        end = at + new
        if end > self.capacity:
            raise InputError(f"the KV cache holds {self.capacity} positions; this step needs {end} "
                             f"({at} cached + {new} new): make a larger cache")
        kp, vp = (k, v) if packing is None else (packing.unpack(t.transpose(1, 2)).transpose(1, 2) for t in (k, v))
        ring = self.ring[layer]
        if ring is None or end <= ring:            # positions are slots: read back everything up to `end`
            self.k[layer][:, :, at:end] = kp
            self.v[layer][:, :, at:end] = vp
            out = (self.k[layer][:, :, :end], self.v[layer][:, :, :end])
        else:
            kept = min(at, ring)                   # cached keys the new queries may still see, oldest first
            order = torch.arange(at - kept, at, device=kp.device) % ring
            out = (torch.cat([self.k[layer].index_select(2, order), kp], 2),
                   torch.cat([self.v[layer].index_select(2, order), vp], 2))
            last = min(new, ring)                  # only the last W new positions stay in the ring
            slots = torch.arange(end - last, end, device=kp.device) % ring
            self.k[layer].index_copy_(2, slots, kp[:, :, new - last:])
            self.v[layer].index_copy_(2, slots, vp[:, :, new - last:])
        self.filled[layer] = end
        return (k, v) if packing is not None else out
