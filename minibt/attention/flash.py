"""SDPA restricted to the flash kernel: if the kernel cannot take the input, say so; never another kernel.
A window goes in as a boolean mask (where the kernel takes a mask: on CPU it does, on CUDA it does not)."""
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import BackendError
from .mask import AttnMask


def flash(q, k, v, *, mask: AttnMask, scale: float):
    sq, skv = q.shape[2], k.shape[2]
    causal = mask.plain_causal(sq, skv)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask.allowed(sq, skv),
                                                 is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    except RuntimeError as e:
        raise BackendError(
            f"the flash kernel cannot take q {tuple(q.shape)} {q.dtype} on {q.device} with this mask "
            f"(padding={mask.key_padding is not None}, causal={mask.causal}, window={mask.window}): "
            f"{str(e).splitlines()[0]}. "
            "Use attn='varlen' (removes padding) or attn='sdpa'.") from None
    empty = mask.empty_rows(sq, skv)
    return out if empty is None else out.masked_fill(empty, 0.0)
