"""What the decoders (OPT, Llama) share, as plain functions their forward calls: input checks with left padding and
a KV cache, and the LM head's output."""
from __future__ import annotations

import torch

from ..errors import InputError
from .common import Output, check_ids, check_mask


def causal_inputs(model, input_ids, attention_mask, position_ids, past: int):
    """-> (attention_mask (B, past + S), position_ids (B, S)), validated.

    attention_mask covers the cached and the new tokens (left padding: 1 = real). Position ids follow the mask, so a
    row's first real token is position 0 whatever its padding (as transformers computes them for left padding)."""
    check_ids(input_ids, vocab_size=model.config.vocab_size, max_length=model.max_length() - past)
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(b, past + s, dtype=torch.long, device=input_ids.device)
    attention_mask = check_mask(attention_mask, (b, past + s), "(batch, cached + new tokens)")
    if position_ids is None:
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)[:, past:]
    elif tuple(position_ids.shape) != (b, s):
        raise InputError(f"position_ids shape {tuple(position_ids.shape)} does not match input_ids {(b, s)}")
    return attention_mask, position_ids


def causal_output(layout, x, lm_head, probs, cache, last_only: bool) -> Output:
    """The last hidden states and logits, unpacked; last_only: only the last position (generation's next token)."""
    if last_only:
        x = layout.unpack(x)[:, -1:]                                  # left padding: the last column is real
        logits = lm_head(x) if lm_head is not None else None
    else:
        logits = layout.unpack(lm_head(x)) if lm_head is not None else None
        x = layout.unpack(x)
    return Output(x, logits, attentions=tuple(probs) if probs is not None else None, past_key_values=cache)


def generate_method(model, input_ids, attention_mask=None, **kwargs):
    """Prompt + new tokens, like transformers' generate; see minibt.generate.generate for the options."""
    from ..generate import generate
    return generate(model, input_ids, attention_mask=attention_mask, **kwargs)
