"""One forward's batch as attention sees it: the checked ids and mask, where the real tokens are, and the attention
call that every layer makes.

A family's forward makes one `Batch` at its entry, hands it to every layer, and calls `batch.unpack` at its exit:

    batch = Batch(attention_mask, input_ids.shape, self.backend, causal=True, cache=cache)
    x = self.embed(batch.pack(input_ids))            # (B, S, H), or (1, T, H): the real tokens back to back
    for layer in self.layers:
        x, probs = layer(x, batch)                   # each attention: batch.attend(q, k, v, scale=...)
    return batch.unpack(x)                           # (B, S, H), exactly 0 at padded positions

For a `packed` backend (varlen, fused) the padding is removed once at the entry and restored once at the exit, so
embeddings, linear layers, norms and the MLP run on real tokens only (`Packing`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BackendError, InputError
from .mask import AttnMask

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ---------------------------------------------------------------------------------------------- input checks

def check_ids(input_ids, *, vocab_size: int, max_length: int, name: str = "input_ids"):
    """Integer (B, S) token ids inside the vocabulary and the model's positions; an InputError names the fault."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in INT_DTYPES:
        raise InputError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise InputError(f"{name} must be (batch, sequence), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > max_length:
        raise InputError(f"sequence length {input_ids.shape[1]} exceeds the model's limit of {max_length} positions "
                         "(max_position_embeddings in config.json); truncate the input (tokenizer truncation=True)")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise InputError(f"token id {int(bad)} is outside the vocabulary (vocab_size={vocab_size} in config.json)")


def check_mask(attention_mask, shape, what: str = "input_ids shape", device=None):
    """attention_mask: bool or integer 0/1 of `shape` (1 = real token). Returns it as long; all ones when None."""
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.long, device=device)
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} does not match {what} {tuple(shape)}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise InputError(f"attention_mask must be bool or integer 0/1 (1 = real token), got dtype "
                             f"{attention_mask.dtype}; an additive mask (0 / -10000) is not accepted")
        if attention_mask.numel() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0]
            raise InputError(f"attention_mask values must be 0 or 1 (1 = real token), found {int(bad)}")
    return attention_mask.long()


def check_positions(position_ids, shape, max_length: int | None = None):
    """Caller-given position ids: an integer tensor of input_ids' shape, each in [0, max_length)."""
    if not isinstance(position_ids, torch.Tensor):
        raise InputError(f"position_ids must be a torch.Tensor of integer positions, got {type(position_ids).__name__}")
    if position_ids.dtype not in INT_DTYPES:
        raise InputError(f"position_ids must hold integer positions, got dtype {position_ids.dtype}")
    if tuple(position_ids.shape) != tuple(shape):
        raise InputError(f"position_ids shape {tuple(position_ids.shape)} does not match input_ids {tuple(shape)}")
    if max_length is not None and position_ids.numel():
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0 or high >= max_length:
            raise InputError(f"position_ids hold {low if low < 0 else high}, outside the model's positions "
                             f"[0, {max_length}) (max_position_embeddings in config.json)")
    return position_ids


def cache_length(past_key_values) -> int:
    """Positions already in `past_key_values`: None (no cache) or minibt's KVCache (KVCache.for_model); the tuples
    of other libraries are refused by name, not read."""
    from .cache import KVCache
    if past_key_values is None:
        return 0
    if not isinstance(past_key_values, KVCache):
        raise InputError(f"past_key_values must be a minibt KVCache (minibt.attention.KVCache.for_model(model, batch, "
                         f"capacity)) or None, got {type(past_key_values).__name__}; transformers' tuples and Cache "
                         "objects are not read")
    return past_key_values.length


# ---------------------------------------------------------------------------------------------- packing

class Packing:
    """Gathers the real tokens of a (B, S) batch into one (1, T) sequence, in order.

    Works for right, left or holey padding: tokens are picked by index, so each row's real tokens end up contiguous
    and cu_seqlens marks where each row starts.
    """

    def __init__(self, attention_mask: torch.Tensor):
        self.batch, self.seq = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)                          # (T,)
        self.cu_seqlens = F.pad(attention_mask.sum(1).cumsum(0), (1, 0)).to(torch.int64)      # (B + 1,)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (1, T, ...)"""
        return t.reshape(self.batch * self.seq, *t.shape[2:])[self.index].unsqueeze(0)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """(1, T, ...) -> (B, S, ...), zeros where the batch had padding."""
        out = t.new_zeros(self.batch * self.seq, *t.shape[2:])
        out[self.index] = t[0]
        return out.view(self.batch, self.seq, *t.shape[2:])


# ---------------------------------------------------------------------------------------------- the batch

class Batch:
    """The mask, the layout and the attention call of one forward pass.

    attention_mask: (B, past + S) long 0/1 over cached and new tokens (checked: `check_mask`).
    backend: the model's registry entry; `auto` is routed here, once, for this input.
    causal / cache: decoders; the new tokens sit after the cache's `length` positions (the query offset).
    probs: the attention call also returns each layer's probabilities (output_attentions=True).
    variants: the attention variants the model's layers use (so `auto` picks a layout that suits them all).
    rope: (cos, sin) of the batch's positions, in its layout, for rotary families; their forward sets it.
    relative: a RelativeBias whose table all layers share (MPNet); the family's forward sets it.
    """

    rope: tuple | None = None
    relative = None

    def __init__(self, attention_mask, shape, backend, *, causal: bool = False, cache=None, probs: bool = False,
                 variants=frozenset()):
        from . import for_call                        # the registry, which imports this module
        self._for_call, self._entry, self._mask_long = for_call, backend, attention_mask
        self.backend = for_call(backend, attention_mask, probs, variants)
        self.probs = probs
        if probs and not self.backend.probs:
            raise BackendError(f"backend {self.backend.name!r} cannot return attention probabilities; "
                               "use model.set_attention('naive') (or 'auto') for output_attentions=True")
        self.cache = cache
        self.past = cache.length if cache is not None else 0          # where this call's tokens start in the cache
        self.keys = self.past + shape[1]                               # keys a layer with a full cache attends over
        real = attention_mask.bool()
        self.real = None if bool(real.all()) else real                 # None: no row has padding
        # Only a prefill is packed; a decode step reads the padded KV cache (one query per row).
        if self.backend.packed and self.past == 0 and shape[0] * shape[1] > 0:
            self.packing = Packing(real)
            self.mask = AttnMask(causal=causal, cu_seqlens=self.packing.cu_seqlens)
        else:
            self.packing = None
            self.mask = AttnMask(self.real, causal=causal, q_offset=self.past)
        self._backends = {frozenset(variants): self.backend}          # per set of variants a layer asks for
        self._last_keys = {}                                           # masks over a rolling cache's last keys

    def pack(self, t):
        """(B, S, ...) -> (1, T, ...) for packed backends; unchanged otherwise."""
        return t if self.packing is None else self.packing.pack(t)

    def unpack(self, t):
        """The one exit: (B, S, ...) with exactly 0 at padded positions."""
        if self.packing is not None:
            return self.packing.unpack(t)
        if self.real is None:
            return t
        real = self.real[:, -t.shape[1]:]                # decode steps: the mask also covers cached tokens
        return t.masked_fill(~real.view(*real.shape, *[1] * (t.dim() - 2)), 0)

    def attend(self, q, k, v, *, scale: float, window=None, alibi=None, relative=None, softcap=None, sinks=None):
        """q (B, Hq, Sq, D), k, v (B, Hkv, Skv, D) -> (out (B, Hq, Sq, Dv), probs (B, Hq, Sq, Skv) or None).
        The variants are the layer's (attention/mask.py defines each); a backend that cannot compute one is
        refused by name, and `auto` picks one that can."""
        mask = self.mask
        if not self.packing and k.shape[2] != self.keys:          # a rolling cache returned only its last keys
            if k.shape[2] not in self._last_keys:
                self._last_keys[k.shape[2]] = mask.last_keys(k.shape[2], q.shape[2])
            mask = self._last_keys[k.shape[2]]
        if window is not None or alibi is not None or relative is not None or softcap is not None or sinks is not None:
            mask = mask.with_variants(window=window, alibi=alibi, relative=relative, softcap=softcap, sinks=sinks)
        needs = frozenset(mask.variants() | ({"vdim"} if v.shape[3] != q.shape[3] else set()))
        if needs not in self._backends:
            self._backends[needs] = self._for_call(self._entry, self._mask_long, self.probs, needs)
        fn = self._backends[needs].fn
        if self.probs:
            return fn(q, k, v, mask=mask, scale=scale, return_probs=True)
        return fn(q, k, v, mask=mask, scale=scale), None
