"""What every family shares: the output record, activations, input checks, backend binding, entry/exit."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention
from ..attention import AttnMask
from ..errors import BackendError, ConfigError, InputError
from ..kernels.padding import Packing


@dataclass
class Output:
    last_hidden_state: torch.Tensor                 # (B, S, H); exactly 0 where attention_mask == 0
    logits: torch.Tensor | None = None              # (B, S, V) for LM heads, (B, labels) for classification
    pooler_output: torch.Tensor | None = None       # (B, H) BERT pooler, when the checkpoint has one
    attentions: tuple | None = None                 # per layer (B, Hq, S, S), with output_attentions=True
    past_key_values: object | None = None           # decoders: the KV cache after this call


ACTIVATIONS = {
    "gelu": F.gelu,                                              # exact (erf)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),         # the tanh approximation, as in GPT-2
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str, where: str):
    if name not in ACTIVATIONS:
        raise ConfigError(f"config.json {where}={name!r} is not supported; minibt has {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_inputs(input_ids, attention_mask, *, vocab_size: int, max_length: int):
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.shape[1] > max_length:
        raise InputError(f"sequence length {input_ids.shape[1]} exceeds the model's limit of {max_length} positions "
                         "(max_position_embeddings in config.json); truncate the input (tokenizer truncation=True)")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise InputError(f"token id {int(bad)} is outside the vocabulary (vocab_size={vocab_size} in config.json)")


class Batch:
    """The mask of one forward pass and, for backends that want it, the packing. Made once at the model's entry;
    `unpack` is the one exit (padding back, and exactly 0 at padded positions)."""

    def __init__(self, attention_mask, shape, *, packed: bool, causal: bool, q_offset: int = 0):
        real = None if attention_mask is None else attention_mask.bool()
        if real is not None and bool(real.all()):
            real = None
        self.real = real
        if packed and shape[0] * shape[1] > 0:
            self.packing = Packing(real if real is not None else torch.ones(shape, dtype=torch.bool))
            self.mask = AttnMask(causal=causal, cu_seqlens=self.packing.cu_seqlens)
        else:
            self.packing = None
            self.mask = AttnMask(real, causal=causal, q_offset=q_offset)

    def pack(self, t):
        """(B, S, ...) -> (1, T, ...) for packed backends; unchanged otherwise."""
        return t if self.packing is None or t is None else self.packing.pack(t)

    def unpack(self, t):
        if self.packing is not None:
            return self.packing.unpack(t)
        if self.real is None:
            return t
        real = self.real[:, -t.shape[1]:]                # decode steps: the mask also covers cached tokens
        return t.masked_fill(~real.view(*real.shape, *[1] * (t.dim() - 2)), 0)


# `auto` (measured, docs/benchmarks.md "encoder_padding"): the packed path wins from this padding fraction up;
# below it, the dense SDPA path (no pack/unpack, one batched attention call) is as fast or faster.
AUTO_VARLEN_FROM = 0.05


def auto_backend(attention_mask, output_attentions: bool) -> str:
    if output_attentions:
        return "naive"                      # the only backend that returns probabilities
    if attention_mask is None or attention_mask.numel() == 0:
        return "sdpa"
    padding = 1.0 - float(attention_mask.float().mean())
    return "varlen" if padding >= AUTO_VARLEN_FROM else "sdpa"


class Model(nn.Module):
    """Backend binding shared by all families."""

    family = "?"

    def set_attention(self, name: str):
        """Switch the attention backend in place ("auto" picks per call); returns the model."""
        self.backend = None if name == "auto" else attention.get(name)
        self.attn = name
        return self

    def route(self, attention_mask, output_attentions: bool) -> attention.Backend:
        """The backend for this call: the fixed one, or auto's pick for this input."""
        if self.backend is not None:
            return self.backend
        return attention.get(auto_backend(attention_mask, output_attentions))

    def tied(self) -> dict:
        """{parameter name: the parameter it is tied to}."""
        return {}

    @staticmethod
    def bind(backend: attention.Backend, output_attentions: bool):
        """The attention function for one forward, and the list it fills with probabilities if asked."""
        if not output_attentions:
            return backend.fn, None
        if not backend.probs:
            raise BackendError(f"backend {backend.name!r} cannot return attention probabilities; "
                               "use model.set_attention('naive') (or 'auto') for output_attentions=True")
        probs = []

        def attend(q, k, v, *, mask, scale):
            out, p = backend.fn(q, k, v, mask=mask, scale=scale, return_probs=True)
            probs.append(p)
            return out
        return attend, probs
