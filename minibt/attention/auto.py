"""`auto`: the routing rule that picks an attention function per call, from the input at hand.

Measured (docs/benchmarks.md, "encoder_padding"; bert-base shape, fp32, B8 S128, 2 CPU threads): the packed path
(varlen) wins from 5% padding up; below it the dense SDPA path (no pack/unpack, one batched attention call) is as
fast or faster. `fused` is correct but slower than varlen at every point measured, so auto never picks it.
"""
from __future__ import annotations

VARLEN_FROM = 0.05          # padding fraction from which the packed path wins


def auto(attention_mask, output_attentions: bool) -> str:
    if output_attentions:
        return "naive"                      # the only backend that returns probabilities
    if attention_mask is None or attention_mask.numel() == 0:
        return "sdpa"
    padding = 1.0 - float(attention_mask.float().mean())
    return "varlen" if padding >= VARLEN_FROM else "sdpa"
