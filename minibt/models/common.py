"""What every family shares: the output record, activations, input checks, the token layout of one forward (padding
removed at the entry and restored at the exit for packed backends), and backend binding."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention
from ..attention import AttnMask, Backend
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


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_ids(input_ids, *, vocab_size: int, max_length: int, name: str = "input_ids"):
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in _INT_DTYPES:
        raise InputError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise InputError(f"{name} must be (batch, sequence), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > max_length:
        raise InputError(f"sequence length {input_ids.shape[1]} exceeds the model's limit of {max_length} positions "
                         "(max_position_embeddings in config.json); truncate the input (tokenizer truncation=True)")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise InputError(f"token id {int(bad)} is outside the vocabulary (vocab_size={vocab_size} in config.json)")


def check_mask(attention_mask, shape, what: str = "input_ids shape"):
    """attention_mask: bool or integer 0/1 of `shape` (1 = real token). Returns it as long, or None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(shape):
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} does not match {what} {tuple(shape)}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise InputError(f"attention_mask must be bool or integer 0/1 (1 = real token), got dtype "
                             f"{attention_mask.dtype}; an additive mask (0 / -10000) is not accepted")
        if attention_mask.numel() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0]
            raise InputError(f"attention_mask values must be 0 or 1 (1 = real token), found {int(bad)}")
    return attention_mask.long()


def check_inputs(input_ids, attention_mask, *, vocab_size: int, max_length: int):
    """Validated (input_ids, attention_mask as long 0/1 or None); every fault is an InputError naming it."""
    check_ids(input_ids, vocab_size=vocab_size, max_length=max_length)
    return check_mask(attention_mask, input_ids.shape)


class TokenLayout:
    """The mask of one forward pass and, for packed backends, where the real tokens are. Made once at the model's
    entry; `pack` gathers the real tokens (B, S, ...) -> (1, T, ...), `unpack` is the one exit (padding back, and
    exactly 0 at padded positions)."""

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


class Model(nn.Module):
    """What the loader and the tools rely on in every family."""

    family = "?"
    causal = False                      # decoders (OPT, Llama): True
    head_kinds: tuple = ()              # the model heads this family can have: "base", "masked-lm", ...
    source: Path | None = None          # the folder it was loaded from (set by loading.py)
    generation: dict = {}               # eos/pad/bos token ids from config.json + generation_config.json
    quantization: dict | None = None    # set when weights were quantized: scheme, quantized modules, group sizes
    attn = "auto"                       # the name of the attention backend in use
    backend: Backend = None

    def set_attention(self, name: str):
        """Switch the attention backend in place (any name in minibt.attention.backends()); returns the model."""
        self.backend = attention.use(self, name)
        self.attn = name
        return self

    def tied(self) -> dict:
        """{parameter name: the parameter it is tied to}."""
        return {}

    def bind(self, attention_mask, output_attentions: bool):
        """(backend, the attention function for one forward, the list it fills with probabilities if asked)."""
        backend = attention.for_call(self.backend, attention_mask, output_attentions)
        if not output_attentions:
            return backend, backend.fn, None
        if not backend.probs:
            raise BackendError(f"backend {backend.name!r} cannot return attention probabilities; "
                               "use model.set_attention('naive') (or 'auto') for output_attentions=True")
        probs = []

        def attend(q, k, v, *, mask, scale):
            out, p = backend.fn(q, k, v, mask=mask, scale=scale, return_probs=True)
            probs.append(p)
            return out
        return backend, attend, probs

    def check_token_types(self, input_ids, token_type_ids):
        """token_type_ids: zeros when absent; else integer, input_ids' shape, below type_vocab_size."""
        types = getattr(self.config, "type_vocab_size", 0)
        if token_type_ids is None:
            return torch.zeros_like(input_ids)
        if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.dtype not in _INT_DTYPES:
            raise InputError("token_type_ids must be an integer tensor")
        if tuple(token_type_ids.shape) != tuple(input_ids.shape):
            raise InputError(f"token_type_ids shape {tuple(token_type_ids.shape)} does not match input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if token_type_ids.numel() and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= max(types, 1)):
            raise InputError(f"token_type_ids must be in [0, {max(types, 1)}) (type_vocab_size={types} in "
                             f"config.json), found {int(token_type_ids.max())}")
        return token_type_ids
