"""What the decoders (OPT, Llama) share: plain functions their forward calls (input checks with left padding and a
KV cache, the LM head's output) and a small base class (head kinds, tying, generate)."""
from __future__ import annotations

import torch

from ..errors import InputError
from .common import Model, Output, TokenLayout, check_ids, check_mask


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


def causal_entry(model, input_ids, attention_mask, position_ids, cache, output_attentions):
    """The decoders' entry: checked inputs, the attention function for this call and the token layout.
    -> (layout, position_ids in the layout, attend, probs)."""
    past = cache.length if cache is not None else 0
    attention_mask, position_ids = causal_inputs(model, input_ids, attention_mask, position_ids, past)
    backend, attend, probs = model.bind(attention_mask, output_attentions)
    # Only a prefill is packed; a decode step reads the padded KV cache (one query per row).
    layout = TokenLayout(attention_mask, input_ids.shape, packed=backend.packed and past == 0, causal=True,
                         q_offset=past)
    return layout, layout.pack(position_ids), attend, probs


def causal_output(layout, x, lm_head, probs, cache, last_only: bool) -> Output:
    """The last hidden states and logits, unpacked; last_only: only the last position (generation's next token)."""
    if last_only:
        x = layout.unpack(x)[:, -1:]                                  # left padding: the last column is real
        logits = lm_head(x) if lm_head is not None else None
    else:
        logits = layout.unpack(lm_head(x)) if lm_head is not None else None
        x = layout.unpack(x)
    return Output(x, logits, attentions=tuple(probs) if probs is not None else None, past_key_values=cache)


class CausalLM(Model):
    """What OPT and Llama share as models: the causal-LM head kinds, the LM head tied to the embeddings, generate."""

    causal = True
    head_kinds = ("base", "causal-lm")

    def tied(self):
        return {"lm_head.weight": "embed.weight"} if self.lm_head is not None and self.config.tie_word_embeddings else {}

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Prompt + new tokens, like transformers' generate; see minibt.generate.generate for the options."""
        from ..generate import generate
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)
