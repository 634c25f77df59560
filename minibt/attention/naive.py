"""The executable spec: scores, softmax in (at least) fp32, weighted sum. Every backend is tested against it.

For one head h, query i and key j (the order is the definition; attention/mask.py names each variant's source):

    s[i, j] = scale * q[i] . k[j]
            - alibi[h] * |i - j|                     ALiBi (Press et al., 2022)
            + table[bucket(j - i), h]                relative-position buckets (T5, MPNet)
    s[i, j] = c * tanh(s[i, j] / c)                  logit softcap (Gemma 2)
    s[i, j] = -inf where the mask forbids j          padding, causality, packing, window i - left <= j <= i + right
    p[i, j] = exp(s[i, j]) / (exp(sink[h]) + sum_j' exp(s[i, j']))     softmax; the sink term only with sinks
    out[i]  = sum_j p[i, j] v[j]

A row with no key returns zeros, never NaN.
"""
import torch

from .mask import AttnMask


def naive(q, k, v, *, mask: AttnMask, scale: float, return_probs: bool = False):
    b, hq, sq, d = q.shape
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    # GQA: view the query heads as (Hkv, group) so each group reads its shared K/V head; K/V are not copied.
    qg = q.to(acc).view(b, hkv, g, sq, d)                                           # (B, Hkv, G, Sq, D)
    scores = qg @ k.to(acc).unsqueeze(2).transpose(-1, -2) * scale                  # (B, Hkv, G, Sq, Skv)
    bias = mask.score_bias(sq, skv, acc)                                            # (1, Hq, Sq, Skv) or None
    if bias is not None:
        scores = scores + bias.view(1, hkv, g, sq, skv)
    if mask.softcap is not None:
        scores = mask.softcap * torch.tanh(scores / mask.softcap)
    allowed = mask.allowed(sq, skv)
    if allowed is not None:
        allowed = allowed.unsqueeze(2)                                              # (B, 1, 1, Sq, Skv)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask.sinks is None:
        probs = scores.softmax(-1)
    else:                                   # one more logit per head in the denominator, its weight dropped
        sink = mask.sinks.to(acc).view(1, hkv, g, 1, 1).expand(b, -1, -1, sq, 1)
        probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
    if allowed is not None:
        probs = probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)             # a row with no key: zeros, not NaN
    out = (probs @ v.to(acc).unsqueeze(2)).view(b, hq, sq, dv).to(q.dtype)
    return (out, probs.view(b, hq, sq, skv)) if return_probs else out
