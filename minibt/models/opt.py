"""OPT (Zhang et al., 2022): learned positions offset by 2, pre-LN (or post-LN, opt-350m) decoder layers, optional
project_in/out around the stack, ReLU MLP, and an LM head tied to the embeddings.

Textbook maths only (speed is applied from outside, after loading: minibt/kernels/). Shape legend in
minibt/attention/__init__.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..attention import Batch, cache_length, check_ids, check_mask, check_positions
from ..config import Fields
from .common import ACTIVATIONS, CausalLM, Output, activation

# Why 2: fairseq reserved the first two rows of the position table (padding_idx + 1); hub checkpoints keep them.
POSITION_OFFSET = 2


# ------------------------------------------------------------------------------------------------------ config

@dataclass
class OPTConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_positions: int = 2048
    embed_dim: int | None = None            # word_embed_proj_dim: != hidden_size in opt-350m (project_in/out)
    pre_norm: bool = True                   # do_layer_norm_before; False in opt-350m (post-LN)
    final_norm: bool = True
    bias: bool = True
    act: str = "relu"
    pad_token_id: int | None = 1
    tie_word_embeddings: bool = True

    @property
    def num_kv_heads(self):
        return self.num_heads

    def windows(self) -> list:
        return [None] * self.num_layers             # every layer attends to the whole sequence

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, c: dict, where: str = "config.json") -> "OPTConfig":
        f = Fields(c, where)
        hidden = f.int("hidden_size")
        pre = f.bool("do_layer_norm_before", True)
        cfg = cls(vocab_size=f.int("vocab_size"), hidden_size=hidden, num_layers=f.int("num_hidden_layers", min=0),
                  num_heads=f.int("num_attention_heads"), ffn_dim=f.int("ffn_dim"),
                  max_positions=f.int("max_position_embeddings", 2048),
                  embed_dim=f.int("word_embed_proj_dim", None, none_ok=True) or hidden, pre_norm=pre,
                  final_norm=pre and not f.bool("_remove_final_layer_norm", False), bias=f.bool("enable_bias", True),
                  act=f.str("activation_function", "relu", choices=tuple(ACTIVATIONS)),
                  pad_token_id=f.int("pad_token_id", 1, min=0, none_ok=True),
                  tie_word_embeddings=f.bool("tie_word_embeddings", True))
        f.divides("hidden_size", "num_attention_heads", hidden, cfg.num_heads)
        return cfg


# ------------------------------------------------------------------------------------------------------ blocks

class Attention(nn.Module):
    """Causal multi-head self-attention (every head has its own keys and values)."""

    def __init__(self, cfg: OPTConfig, index: int):
        super().__init__()
        h = cfg.hidden_size
        self.index, self.num_heads, self.head_dim = index, cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(h, 3 * h, bias=cfg.bias)                                  # q, k, v in one matmul
        self.out = nn.Linear(h, h, bias=cfg.bias)

    def forward(self, x, batch: Batch):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, Hq, S, D)
        if batch.cache is not None:                    # written at positions past.., read back from 0
            k, v = batch.cache.write(self.index, k, v, batch.past, batch.packing)     # (B, Hq, past + S, D)
        a, probs = batch.attend(q, k, v, scale=self.head_dim ** -0.5)                  # (B, Hq, S, D)
        return self.out(a.transpose(1, 2).reshape(b, s, h)), probs                     # (B, S, H)


class MLP(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=cfg.bias)
        self.act = activation(cfg.act, "activation_function")
        self.down = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class OPTLayer(nn.Module):
    """Pre-LN: x = x + attention(norm1(x)); x = x + mlp(norm2(x)). Post-LN (opt-350m): the norms after each sum."""

    def __init__(self, cfg: OPTConfig, index: int):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.norm1 = nn.LayerNorm(cfg.hidden_size)
        self.attention = Attention(cfg, index)
        self.norm2 = nn.LayerNorm(cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x, batch: Batch):
        if self.pre_norm:
            a, probs = self.attention(self.norm1(x), batch)
            x = x + a
            return x + self.mlp(self.norm2(x)), probs
        a, probs = self.attention(x, batch)
        x = self.norm1(x + a)
        return self.norm2(x + self.mlp(x)), probs


# ------------------------------------------------------------------------------------------------------ model

class OPT(CausalLM):
    family = "opt"
    config_from_hf = staticmethod(OPTConfig.from_hf)

    def __init__(self, cfg: OPTConfig, head: str = "causal-lm"):
        super().__init__()
        self.config, self.head = cfg, head
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.positions = nn.Embedding(cfg.max_positions + POSITION_OFFSET, cfg.hidden_size)
        projected = cfg.embed_dim != cfg.hidden_size
        self.project_in = nn.Linear(cfg.embed_dim, cfg.hidden_size, bias=False) if projected else None
        self.layers = nn.ModuleList(OPTLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size) if cfg.final_norm else None
        self.project_out = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False) if projected else None
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False) if head == "causal-lm" else None

    def max_length(self) -> int:
        return self.config.max_positions

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                output_attentions=False, last_only=False):
        """input_ids (B, S); attention_mask (B, past + S) over cached and new tokens (left padding: 1 = real);
        past_key_values: a KVCache (attention/cache.py) that this call reads and extends; last_only: the hidden
        state and logits of the last position only (generation's next token)."""
        cache = past_key_values
        past = cache_length(cache)
        check_ids(input_ids, vocab_size=self.config.vocab_size, max_length=self.max_length() - past)
        b, s = input_ids.shape
        mask = check_mask(attention_mask, (b, past + s), "(batch, cached + new tokens)", input_ids.device)
        if position_ids is None:        # a row's first real token is position 0, whatever its left padding
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]
        else:
            check_positions(position_ids, (b, s), self.max_length())
        batch = Batch(mask, (b, s), self.backend, causal=True, cache=cache, probs=output_attentions)

        x = self.embed(batch.pack(input_ids))                                    # (B, S, E), or (1, T, E) packed
        if self.project_in is not None:
            x = self.project_in(x)                                               # E -> H
        x = x + self.positions(batch.pack(position_ids) + POSITION_OFFSET)
        attentions = []
        for layer in self.layers:
            x, probs = layer(x, batch)
            attentions.append(probs)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)                                              # H -> E

        if last_only:
            x = batch.unpack(x)[:, -1:]                                          # left padding: the last column is real
            logits = self.lm_head(x) if self.lm_head is not None else None
        else:
            logits = batch.unpack(self.lm_head(x)) if self.lm_head is not None else None
            x = batch.unpack(x)
        return Output(x, logits, attentions=tuple(attentions) if output_attentions else None, past_key_values=cache)
