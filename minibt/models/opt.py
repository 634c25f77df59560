"""OPT: learned positions offset by 2, pre-LN or post-LN layers, optional project_in/out, ReLU, tied LM head."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .common import activation
from .decoder import Decoder, DecodeLinear

# Why 2: fairseq reserved the first two rows of the position table (padding_idx + 1); hub checkpoints keep them.
POSITION_OFFSET = 2


@dataclass
class OPTConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_positions: int
    embed_dim: int                          # word_embed_proj_dim: != hidden_size in opt-350m (project_in/out)
    pre_norm: bool = True                   # do_layer_norm_before; False in opt-350m (post-LN)
    final_norm: bool = True
    bias: bool = True
    act: str = "relu"
    pad_token_id: int | None = 1
    tie_word_embeddings: bool = True

    @property
    def num_kv_heads(self):
        return self.num_heads

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, c: dict) -> "OPTConfig":
        pre = c.get("do_layer_norm_before", True)
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["ffn_dim"],
                   c.get("max_position_embeddings", 2048), c.get("word_embed_proj_dim") or c["hidden_size"], pre,
                   pre and not c.get("_remove_final_layer_norm", False), c.get("enable_bias", True),
                   c.get("activation_function", "relu"), c.get("pad_token_id", 1), c.get("tie_word_embeddings", True))


class OPTLayer(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads, self.head_dim, self.pre = cfg.num_heads, cfg.head_dim, cfg.pre_norm
        self.qkv = DecodeLinear(h, 3 * h, bias=cfg.bias)
        self.out = DecodeLinear(h, h, bias=cfg.bias)
        self.norm1 = nn.LayerNorm(h)
        self.up = DecodeLinear(h, cfg.ffn_dim, bias=cfg.bias)
        self.act = activation(cfg.act, "activation_function")
        self.down = DecodeLinear(cfg.ffn_dim, h, bias=cfg.bias)
        self.norm2 = nn.LayerNorm(h)

    def forward(self, x, mask, attend, kv):
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x) if self.pre else x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv is not None:
            k, v = kv(k, v)                                                        # (B, Hkv, past + S, D)
        x = x + self.out(attend(q, k, v, mask=mask, scale=self.head_dim ** -0.5).transpose(1, 2).reshape(b, s, h))
        if not self.pre:
            x = self.norm1(x)                                                      # post-LN (opt-350m)
        x = x + self.down(self.act(self.up(self.norm2(x) if self.pre else x)))
        return x if self.pre else self.norm2(x)


class OPT(Decoder):
    family = "opt"

    def __init__(self, cfg: OPTConfig, head: str = "causal-lm"):
        super().__init__()
        self.config, self.head = cfg, head
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.positions = nn.Embedding(cfg.max_positions + POSITION_OFFSET, cfg.hidden_size)
        projected = cfg.embed_dim != cfg.hidden_size
        self.project_in = DecodeLinear(cfg.embed_dim, cfg.hidden_size, bias=False) if projected else None
        self.layers = nn.ModuleList(OPTLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size) if cfg.final_norm else None
        self.project_out = DecodeLinear(cfg.hidden_size, cfg.embed_dim, bias=False) if projected else None
        self.lm_head = DecodeLinear(cfg.embed_dim, cfg.vocab_size, bias=False) if head == "causal-lm" else None
        self.set_attention("auto")

    @classmethod
    def from_hf(cls, config: dict, head: str, keys: set):
        return cls(OPTConfig.from_hf(config), head)

    def inputs(self, ids, positions):
        x = self.embed(ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.positions(positions + POSITION_OFFSET)

    def final(self, x):
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.project_out(x) if self.project_out is not None else x
