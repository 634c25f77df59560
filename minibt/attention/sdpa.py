"""torch's fused scaled_dot_product_attention; `is_causal` instead of a mask where that is exact. Windows and score
biases (ALiBi, relative positions) go through its mask: boolean, or additive (-inf where forbidden) with a bias."""
import torch.nn.functional as F

from .mask import AttnMask


def sdpa_mask(mask: AttnMask, sq: int, skv: int, dtype):
    """What SDPA takes as attn_mask for this mask: None, a boolean (B|1, 1, Sq, Skv), or an additive float
    (B|1, Hq|1, Sq, Skv) in the query's dtype when there is a score bias."""
    allowed = mask.allowed(sq, skv)
    bias = mask.score_bias(sq, skv)
    if bias is None:
        return allowed
    bias = bias.to(dtype)
    return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


def sdpa(q, k, v, *, mask: AttnMask, scale: float):
    sq, skv = q.shape[2], k.shape[2]
    causal = mask.plain_causal(sq, skv) and mask.score_bias(sq, skv) is None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else sdpa_mask(mask, sq, skv, q.dtype),
                                         is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    empty = mask.empty_rows(sq, skv)
    return out if empty is None else out.masked_fill(empty, 0.0)   # some kernels give NaN there
