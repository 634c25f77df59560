"""Padding-free attention over a packed batch (see attention/batch.py): no padded token is ever computed.

Kernel chosen by measurement on CPU (torch 2.13, 2 threads; docs/benchmarks.md "encoder_padding"): SDPA on jagged
nested tensors runs the math path one sequence at a time and was 8-10x slower than padded SDPA (B16, S256, 50%
padding: ~270 ms vs ~30 ms), while a loop of per-sequence flash SDPA calls over the offsets took ~16 ms.
So: the loop, one batched call per run of consecutive sequences of equal length. (On CUDA, SDPA on jagged tensors
reaches the flash varlen kernel; that path is not written yet because it cannot be measured or tested here.)

Windows and score biases are positions inside one sequence, so every sequence of a run shares one (L, L) mask:
it is built once per run from a one-sequence AttnMask with the layer's variants.
"""
import torch.nn.functional as F

from .mask import AttnMask
from .sdpa import sdpa, sdpa_mask


def varlen(q, k, v, *, mask: AttnMask, scale: float):
    if not mask.packed:
        # Decode steps read a padded KV cache with one query per row: nothing to unpad, so SDPA with the mask.
        return sdpa(q, k, v, mask=mask, scale=scale)
    gqa = q.shape[1] != k.shape[1]
    shaped = mask.window is not None or mask.alibi is not None or mask.relative is not None
    # (1, Hq, T, Dv) viewed from a (1, T, Hq, Dv) buffer: the layer's transpose(1, 2).reshape(T, H) is then free.
    # Every token belongs to one run below, so every row is written: no need to zero it first.
    out = q.new_empty(1, q.shape[2], q.shape[1], v.shape[3]).transpose(1, 2)
    for start, count, length in mask.runs():
        # `count` sequences of the same length side by side: one batched call (B = count) instead of a loop
        def seqs(t):
            return t[0, :, start:start + count * length].unflatten(1, (count, length)).transpose(0, 1)  # (n, H, L, D)
        if shaped:                              # the layer's window / bias inside one sequence of this length
            one = AttnMask(causal=mask.causal, window=mask.window, alibi=mask.alibi, relative=mask.relative)
            o = F.scaled_dot_product_attention(seqs(q), seqs(k), seqs(v), attn_mask=sdpa_mask(one, length, length,
                                               q.dtype), scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(seqs(q), seqs(k), seqs(v), is_causal=mask.causal, scale=scale,
                                               enable_gqa=gqa)
        out[0, :, start:start + count * length] = o.transpose(0, 1).flatten(1, 2)
    return out
