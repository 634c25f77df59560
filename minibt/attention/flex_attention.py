"""FlexAttention (`torch.nn.attention.flex_attention`): the backend that expresses every variant as code.

    score_mod(s, b, h, q, kv)   ALiBi, relative-position buckets and the softcap, in naive's order
    block mask                  padding, causality, packing and windows: per (query block, key block) of 128 x 128,
                                "empty" (skipped), "full" (no mask applied) or "partial" (mask_mod per score)
    sinks                       one extra key whose score is sink[h] and whose value is zero: the sink's exp sits in
                                the softmax's denominator and adds nothing to the output (exactly naive's sink)

The block mask is built from the mask's boolean form (`AttnMask.allowed`, made once per forward and shared by the
layers) by reducing each 128 x 128 block, not by `create_block_mask`, which evaluates mask_mod per score and was slow
on CPU (seconds for a packed batch of ~10k tokens).

Compiled or eager. `COMPILED = True` (the default) runs `torch.compile`d flex, where the speed is: the first call of
each new shape compiles for seconds, so shapes are padded up to a multiple of 128 queries and keys (padded keys
masked, padded queries dropped) to keep the number of compiled shapes small; when dynamo's recompile limit is
reached minibt raises a BackendError rather than let dynamo fall back to eager without saying so. On CPU the compiled
and eager kernels are inference only (no autograd there, torch 2.13). `minibt.attention.flex_attention.COMPILED = False` runs flex
eager: the same maths, readable and slow, with O(S^2) memory, for reading and for tests.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..errors import BackendError
from .mask import AttnMask

COMPILED = True
BLOCK = 128
_compiled = None


def flex(q, k, v, *, mask: AttnMask, scale: float):
    b, hq, sq, d = q.shape
    skv = k.shape[2]
    sink = mask.sinks is not None
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise BackendError("flex on CPU is inference only (torch 2.13 has no backward for it there): run the model "
                           "under torch.no_grad() / torch.inference_mode(), or use another backend to train")
    compiled = COMPILED
    pq, pk = (-(-sq // BLOCK) * BLOCK, -(-(skv + sink) // BLOCK) * BLOCK) if compiled else (sq, skv + sink)
    # keys: the real ones, one sink key (score sink[h], value 0) when there are sinks, padding up to pk
    allowed = _allowed(mask, b, sq, skv, pq, pk)                               # (B, 1, pq, pk) bool
    k = F.pad(k, (0, 0, 0, pk - skv))
    v = F.pad(v, (0, 0, 0, pk - skv))
    q = F.pad(q, (0, 0, 0, pq - sq))
    blocks = _blocks(mask, allowed)
    extras = (mask.alibi, None if mask.relative is None else mask.relative.table, mask.sinks)
    fn = _compiled_call() if compiled else _call
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        try:
            # offsets as tensors: a compiled call is specialised on Python ints, and these change every decode step
            offsets = torch.tensor([mask.q_offset, skv], device=q.device)
            out = fn(q, k, v, allowed, *blocks, *extras, scale, offsets, mask.softcap, sink,
                     None if mask.relative is None else mask.relative.bucket)
        except Exception as e:                                                  # noqa: BLE001 (dynamo's errors)
            if "recompile" in str(e).lower() or type(e).__name__ == "FailOnRecompileLimitHit":
                raise BackendError(f"flex: dynamo's recompile limit was reached ({_limit()} compiled shapes/mods); "
                                   "minibt does not let it fall back to eager silently. Set "
                                   "minibt.attention.flex_attention.COMPILED = False for eager flex, or use another "
                                   "backend") from None
            raise
    out = out[:, :, :sq]
    empty = mask.empty_rows(sq, skv)
    return out if empty is None else out.masked_fill(empty, 0.0)


def _call(q, k, v, allowed, kv_num, kv_idx, full_num, full_idx, alibi, table, sinks, scale, offsets, softcap,
          sink, bucket):
    """One flex call; score_mod and mask_mod are made here so that a compiled caller traces them afresh."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    q_offset, skv = offsets[0], offsets[1]                              # query 0's position; the sink key's index

    def mask_mod(b, h, qi, ki):
        return allowed[b, 0, qi, ki]

    def score_mod(s, b, h, qi, ki):
        distance = ki - (qi + q_offset)                                  # key - query, on the key axis
        if alibi is not None:
            s = s - alibi[h] * distance.abs()
        if table is not None:
            s = s + table[bucket(distance), h]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if sink:
            s = torch.where(ki == skv, sinks[h].to(s.dtype), s)          # the sink key: its logit, whatever q . k
        return s

    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                          seq_lengths=(q.shape[2], k.shape[2]))
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=q.shape[1] != k.shape[1])


def _compiled_call():
    global _compiled
    if _compiled is None:
        import torch._dynamo
        torch._dynamo.config.fail_on_recompile_limit_hit = True     # never a silent fall back to eager
        _compiled = torch.compile(_call, dynamic=False)
    return _compiled


def _limit() -> int:
    import torch._dynamo
    return int(getattr(torch._dynamo.config, "recompile_limit", 8))


def _allowed(mask: AttnMask, b: int, sq: int, skv: int, pq: int, pk: int) -> torch.Tensor:
    """(B, 1, pq, pk) bool: the mask's own form over the real keys, the sink key (index skv) visible from every
    real query row when there are sinks, padding never visible. Cached per shape in the mask's cache."""
    key = ("flex", sq, skv, pq, pk, mask.window, mask.sinks is not None)
    if key not in mask._cache:
        base = mask.allowed(sq, skv)
        device = mask.key_padding.device if mask.key_padding is not None else None
        out = torch.zeros(b, 1, pq, pk, dtype=torch.bool, device=device)
        out[:, :, :sq, :skv] = True if base is None else base
        if mask.sinks is not None:
            out[:, :, :sq, skv] = True
        mask._cache[key] = out
    return mask._cache[key]


def _blocks(mask: AttnMask, allowed: torch.Tensor):
    """(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) of the BlockMask, by reducing `allowed`
    over BLOCK x BLOCK tiles: a tile with some but not all True is partial, all True is full, none is skipped."""
    key = ("flex-blocks", allowed.shape, id(allowed))
    if key not in mask._cache:
        b, _, sq, skv = allowed.shape
        nq, nk = -(-sq // BLOCK), -(-skv // BLOCK)
        tiles = F.pad(allowed, (0, nk * BLOCK - skv, 0, nq * BLOCK - sq)).view(b, 1, nq, BLOCK, nk, BLOCK)
        some, every = tiles.any(5).any(3), tiles.all(5).all(3)                    # (B, 1, nq, nk)
        mask._cache[key] = (*_indices(some & ~every), *_indices(every))
    return mask._cache[key]


def _indices(tiles: torch.Tensor):
    """Per query block: how many key blocks are marked, and their indices first (the rest of the row after)."""
    num = tiles.sum(-1).to(torch.int32)
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, order
