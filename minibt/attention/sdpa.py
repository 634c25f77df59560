"""torch's fused scaled_dot_product_attention; `is_causal` instead of a mask where that is exact."""
import torch.nn.functional as F

from .mask import AttnMask


def sdpa(q, k, v, *, mask: AttnMask, scale: float):
    sq, skv = q.shape[2], k.shape[2]
    causal = mask.plain_causal(sq, skv)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask.allowed(sq, skv),
                                         is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    empty = mask.empty_rows(sq, skv)
    return out if empty is None else out.masked_fill(empty, 0.0)   # some kernels give NaN there
