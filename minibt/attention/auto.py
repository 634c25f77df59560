"""`auto`: the routing rule that picks an attention function per call, from the input at hand and the attention
variants the layers ask for.

Measured (docs/benchmarks.md, "encoder_padding"; bert-base shape, fp32, B8 S128, 2 CPU threads): the packed path
(varlen) wins from 5% padding up; below it the dense SDPA path (no pack/unpack, one batched attention call) is as
fast or faster. Both compute windows and biases through their masks. Softcaps and sinks go to `tiled` (the
flash-attention algorithm in plain PyTorch: O(S x block) memory, and it skips key blocks outside a window);
docs/benchmarks.md "attention_variants" has the measurements. `fused` is correct but slower than varlen at every
point measured, so auto never picks it.
"""
from __future__ import annotations

VARLEN_FROM = 0.05                                        # padding fraction from which the packed path wins
MASKED = frozenset({"window", "alibi", "relative", "vdim"})   # what sdpa and varlen compute (through their masks)


def auto(attention_mask, output_attentions: bool, variants=frozenset()) -> str:
    if output_attentions:
        return "naive"                      # the only backend that returns probabilities
    if not variants <= MASKED:
        return "tiled"
    if attention_mask is None or attention_mask.numel() == 0:
        return "sdpa"
    padding = 1.0 - float(attention_mask.float().mean())
    return "varlen" if padding >= VARLEN_FROM else "sdpa"
