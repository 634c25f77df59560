"""What every family shares as a model: the output record, activations, and the `Model` base (the attention
backend in use, head kinds, tying, generate). A forward itself is written whole in its family's file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention
from ..attention import Backend
from ..errors import ConfigError


@dataclass
class Output:
    last_hidden_state: torch.Tensor                 # (B, S, H); exactly 0 where attention_mask == 0
    logits: torch.Tensor | None = None              # (B, S, V) for LM heads, (B, labels) for classification
    pooler_output: torch.Tensor | None = None       # (B, H) BERT pooler, when the checkpoint has one
    attentions: tuple | None = None                 # per layer (B, Hq, S, S), with output_attentions=True
    past_key_values: object | None = None           # decoders: the KV cache after this call


def _gelu_tanh(x):
    """The tanh approximation of GELU, as in GPT-2."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu,
               "silu": F.silu, "swish": F.silu}


def activation(name: str, where: str):
    if name not in ACTIVATIONS:
        raise ConfigError(f"config.json {where}={name!r} is not supported; minibt has {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Model(nn.Module):
    """What the loader and the tools rely on in every family."""

    family = "?"
    config_from_hf = None               # staticmethod: (config.json dict, where) -> the family's config
    causal = False                      # decoders (OPT, Llama): True
    head_kinds: tuple = ()              # the model heads this family can have: "base", "masked-lm", ...
    source: Path | None = None          # the folder it was loaded from (set by loading.py)
    generation: dict = {}               # eos/pad/bos token ids from config.json + generation_config.json
    quantization: dict | None = None    # set when weights were quantized: scheme, quantized modules, group sizes
    attn = "auto"                       # the name of the attention backend in use
    backend: Backend = attention.get("auto")   # its registry entry, read by each forward's Batch
    variants: frozenset = frozenset()   # the attention variants its layers use (attention/mask.py): a backend that
                                        # cannot compute one is refused when a forward begins; auto routes by them

    def set_attention(self, name: str):
        """Switch the attention backend in place (any name in minibt.attention.backends()); returns the model."""
        self.backend = attention.use(self, name)
        self.attn = name
        return self

    def tied(self) -> dict:
        """{parameter name: the parameter it is tied to}."""
        return {}


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
