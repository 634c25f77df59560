"""The flash-attention algorithm in plain PyTorch, for reading: keys and values in blocks, an online softmax.

naive materialises the (Sq, Skv) score matrix. Here each block of keys updates three running quantities per query
row, so only a (Sq, block) tile of scores exists at a time:
    m  the largest score seen so far          (for a numerically safe exp)
    l  the sum of exp(score - m) so far       (the softmax denominator)
    o  the sum of exp(score - m) * value      (the unnormalised output)
When a new block raises the maximum from m to m', everything accumulated so far was scaled by exp(-m) and must be
rescaled by exp(m - m'): that one correction factor is the whole trick. At the end out = o / l.
Real kernels also split the queries into blocks (one per thread block / core) and keep the tiles in SRAM or cache;
see docs/attention.md.
"""
import torch

from .mask import AttnMask


def tiled(q, k, v, *, mask: AttnMask, scale: float, block: int = 64):
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(b, hkv, hq // hkv, sq, d) * scale              # (B, Hkv, G, Sq, D), GQA groups
    allowed = mask.allowed(sq, skv)                                     # (B or 1, 1, Sq, Skv) or None
    m = torch.full((b, hkv, hq // hkv, sq, 1), float("-inf"), dtype=acc, device=q.device)
    l = torch.zeros_like(m)
    o = torch.zeros_like(qg)
    for start in range(0, skv, block):
        kb = k[:, :, start:start + block].to(acc).unsqueeze(2)         # (B, Hkv, 1, blk, D)
        vb = v[:, :, start:start + block].to(acc).unsqueeze(2)
        s = qg @ kb.transpose(-1, -2)                                   # (B, Hkv, G, Sq, blk): one tile of scores
        if allowed is not None:
            s = s.masked_fill(~allowed[..., start:start + block].unsqueeze(2), float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)         # a row with no key yet: exp(-inf - 0) = 0
        p = torch.exp(s - m_safe)
        correction = torch.exp(m - m_safe)                              # rescale what was summed under the old max
        l = l * correction + p.sum(-1, keepdim=True)
        o = o * correction + p @ vb
        m = m_new
    out = torch.where(l > 0, o / l.clamp(min=torch.finfo(acc).tiny), 0.0)   # a row with no key at all: zeros
    return out.view(b, hq, sq, d).to(q.dtype)
