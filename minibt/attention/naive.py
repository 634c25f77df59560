"""The executable spec: scores, softmax in (at least) fp32, weighted sum. Every backend is tested against it."""
import torch

from .mask import AttnMask


def naive(q, k, v, *, mask: AttnMask, scale: float, return_probs: bool = False):
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    # GQA: view the query heads as (Hkv, group) so each group reads its shared K/V head; K/V are not copied.
    qg = q.to(acc).view(b, hkv, hq // hkv, sq, d)                                   # (B, Hkv, G, Sq, D)
    scores = qg @ k.to(acc).unsqueeze(2).transpose(-1, -2) * scale                  # (B, Hkv, G, Sq, Skv)
    allowed = mask.allowed(sq, skv)
    if allowed is not None:
        allowed = allowed.unsqueeze(2)                                              # (B, 1, 1, Sq, Skv)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)
    if allowed is not None:
        probs = probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)             # a row with no key: zeros, not NaN
    out = (probs @ v.to(acc).unsqueeze(2)).view(b, hq, sq, d).to(q.dtype)
    return (out, probs.view(b, hq, sq, skv)) if return_probs else out
