"""The flash-attention algorithm in plain PyTorch, for reading: keys and values in blocks, an online softmax.

naive materialises the (Sq, Skv) score matrix. Here each block of keys updates three running quantities per query
row, so only a (Sq, block) tile of scores exists at a time:
    m  the largest score seen so far          (for a numerically safe exp)
    l  the sum of exp(score - m) so far       (the softmax denominator)
    o  the sum of exp(score - m) * value      (the unnormalised output)
When a new block raises the maximum from m to m', everything accumulated so far was scaled by exp(-m) and must be
rescaled by exp(m - m'): that one correction factor is the whole trick. At the end out = o / l.

The variants fit in the same loop: a score bias (ALiBi, relative positions) and the softcap shape each tile's scores
before the mask; a block of keys wholly outside every query's window (or after every query, when causal) is skipped,
which is where a sliding window saves its work; a sink starts each row's running max and sum at (sink, 1), the one
logit that sits in the denominator with no value.
Real kernels also split the queries into blocks (one per thread block / core) and keep the tiles in SRAM or cache;
see docs/attention.md.
"""
import torch

from .mask import AttnMask


def tiled(q, k, v, *, mask: AttnMask, scale: float, block: int = 64):
    b, hq, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(b, hkv, g, sq, d) * scale                      # (B, Hkv, G, Sq, D), GQA groups
    allowed = mask.allowed(sq, skv)                                     # (B or 1, 1, Sq, Skv) or None
    bias = mask.score_bias(sq, skv, acc)                                # (1, Hq, Sq, Skv) or None
    bias = None if bias is None else bias.view(1, hkv, g, sq, skv)
    sinks = None if mask.sinks is None else mask.sinks.to(acc).view(1, hkv, g, 1, 1)
    out = torch.zeros(b, hkv, g, sq, dv, dtype=acc, device=q.device)
    for qs in range(0, sq, block):                                      # one block of queries at a time
        qe = min(qs + block, sq)
        rows = slice(qs, qe)
        if sinks is None:
            m = torch.full((b, hkv, g, qe - qs, 1), float("-inf"), dtype=acc, device=q.device)
            l = torch.zeros_like(m)
        else:                                                           # the sink: exp(sink - m) = 1 with m = sink
            m = sinks.expand(b, -1, -1, qe - qs, 1).clone()
            l = torch.ones_like(m)
        o = torch.zeros(b, hkv, g, qe - qs, dv, dtype=acc, device=q.device)
        lo, hi = _key_range(mask, qs, qe, skv)
        for start in range(lo, hi, block):                              # only key blocks these queries may see
            keys = slice(start, min(start + block, hi))
            kb = k[:, :, keys].to(acc).unsqueeze(2)                     # (B, Hkv, 1, blk, D)
            vb = v[:, :, keys].to(acc).unsqueeze(2)
            s = qg[..., rows, :] @ kb.transpose(-1, -2)                 # (B, Hkv, G, qblk, blk): one tile of scores
            if bias is not None:
                s = s + bias[..., rows, keys]
            if mask.softcap is not None:
                s = mask.softcap * torch.tanh(s / mask.softcap)
            if allowed is not None:
                s = s.masked_fill(~allowed[..., rows, keys].unsqueeze(2), float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)     # a row with no key yet: exp(-inf - 0) = 0
            p = torch.exp(s - m_safe)
            correction = torch.exp(m - m_safe)                          # rescale what was summed under the old max
            l = l * correction + p.sum(-1, keepdim=True)
            o = o * correction + p @ vb
            m = m_new
        out[..., rows, :] = torch.where(l > 0, o / l.clamp(min=torch.finfo(acc).tiny), 0.0)   # no key at all: zeros
    return out.view(b, hq, sq, dv).to(q.dtype)


def _key_range(mask: AttnMask, qs: int, qe: int, skv: int) -> tuple[int, int]:
    """[lo, hi): the keys that queries qs..qe-1 may see at all. Keys before every query's window, after every
    query (causal, or the window's right edge) or outside the packed sequences these queries belong to are never
    read: that is where a sliding window saves its work."""
    left, right = mask.window or (None, None)
    if mask.causal:
        right = 0 if right is None else min(right, 0)
    first, last = mask.q_offset + qs, mask.q_offset + qe - 1          # query positions on the key axis
    lo = 0 if left is None else max(0, first - left)
    hi = skv if right is None else min(skv, last + right + 1)
    if mask.packed:                                                     # queries and keys share the token axis
        bounds = mask.bounds()
        lo = max(lo, next((s for s, e in bounds if e > qs), 0))
        hi = min(hi, next((e for s, e in reversed(bounds) if s < qe), skv))
    return lo, max(lo, hi)
