"""BLOOM (BigScience, 2022): a decoder with ALiBi instead of position embeddings, a LayerNorm right after the
embeddings, pre-LN layers with a GELU MLP, and an LM head tied to the embeddings.

ALiBi (Press et al., 2022): no position enters the hidden states; each head h adds -slope[h] * (i - j) to the score
of query i for key j, slopes a geometric sequence per head (`alibi_slopes`). The penalty is the layer's attention
variant (attention/mask.py); BLOOM's own code adds slope * j, which is the same softmax (a constant per row).
Textbook maths only; shape legend in minibt/attention/__init__.py.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Batch, cache_length, check_ids, check_mask
from ..config import Fields
from ..errors import ConfigError
from .common import CausalLM, Output


# ------------------------------------------------------------------------------------------------------ config

@dataclass
class BloomConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-5
    residual_after_norm: bool = False         # apply_residual_connection_post_layernorm
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None

    @property
    def num_kv_heads(self):
        return self.num_heads

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    def windows(self) -> list:
        return [None] * self.num_layers

    @classmethod
    def from_hf(cls, c: dict, where: str = "config.json") -> "BloomConfig":
        f = Fields(c, where)
        if f.int("pretraining_tp", 1) > 1 and f.bool("slow_but_exact", False):
            f.fail("slow_but_exact", True, "is not supported (it splits the output projection into pretraining_tp "
                   "slices, a different rounding); set it to false")
        cfg = cls(vocab_size=f.int("vocab_size"), hidden_size=f.int("hidden_size", f.c.get("n_embed", 64)),
                  num_layers=f.int("n_layer", min=0), num_heads=f.int("n_head"),
                  layer_norm_eps=f.float("layer_norm_epsilon", 1e-5, positive=True),
                  residual_after_norm=f.bool("apply_residual_connection_post_layernorm", False),
                  tie_word_embeddings=f.bool("tie_word_embeddings", True),
                  pad_token_id=f.int("pad_token_id", None, min=0, none_ok=True))
        f.divides("hidden_size", "n_head", cfg.hidden_size, cfg.num_heads)
        return cfg


def alibi_slopes(heads: int) -> list[float]:
    """The paper's slopes: 2^(-8/n), 2^(-16/n), ... for n the largest power of two <= heads; the remaining heads
    take every other slope of the sequence for 2n."""
    def geometric(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]
    n = 2 ** math.floor(math.log2(heads))
    return geometric(n) + geometric(2 * n)[0::2][:heads - n]


# ------------------------------------------------------------------------------------------------------ blocks

class Attention(nn.Module):
    """Causal multi-head self-attention with the ALiBi penalty. The checkpoint's one q, k, v weight is stored
    interleaved per head ([head][q, k, v][head_dim] rows), so the projection is viewed that way: no weight is
    permuted."""

    def __init__(self, cfg: BloomConfig, index: int):
        super().__init__()
        h = cfg.hidden_size
        self.index, self.num_heads, self.head_dim = index, cfg.num_heads, cfg.head_dim
        self.slopes = alibi_slopes(cfg.num_heads)
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)

    def forward(self, x, batch: Batch):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)  # 3 x (B, Hq, S, D)
        if batch.cache is not None:                    # written at positions past.., read back from 0
            k, v = batch.cache.write(self.index, k, v, batch.past, batch.packing)     # (B, Hq, past + S, D)
        slopes = torch.tensor(self.slopes, device=x.device)
        a, probs = batch.attend(q, k, v, scale=self.head_dim ** -0.5, alibi=slopes)    # (B, Hq, S, D)
        return self.out(a.transpose(1, 2).reshape(b, s, h)), probs                     # (B, S, H)


class MLP(nn.Module):
    """up -> GELU (tanh approximation) -> down."""

    def __init__(self, cfg: BloomConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size)
        self.down = nn.Linear(4 * cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class BloomLayer(nn.Module):
    """Pre-LN: x = x + attention(norm1(x)); x = x + mlp(norm2(x)). With residual_after_norm the residual is the
    normed input instead (a BLOOM option)."""

    def __init__(self, cfg: BloomConfig, index: int):
        super().__init__()
        self.residual_after_norm = cfg.residual_after_norm
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg, index)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, batch: Batch):
        h = self.norm1(x)
        a, probs = self.attention(h, batch)
        x = (h if self.residual_after_norm else x) + a
        h = self.norm2(x)
        return (h if self.residual_after_norm else x) + self.mlp(h), probs


# ------------------------------------------------------------------------------------------------------ model

class Bloom(CausalLM):
    family = "bloom"
    config_from_hf = staticmethod(BloomConfig.from_hf)
    variants = frozenset({"alibi"})                 # every layer's attention: the ALiBi penalty

    def __init__(self, cfg: BloomConfig, head: str = "causal-lm"):
        super().__init__()
        self.config, self.head = cfg, head
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BloomLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if head == "causal-lm" else None

    def max_length(self) -> int:
        return sys.maxsize                     # ALiBi has no position table: any length the memory allows


    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                output_attentions=False, last_only=False):
        """input_ids (B, S); attention_mask (B, past + S) over cached and new tokens (left padding: 1 = real);
        past_key_values: a KVCache (attention/cache.py) that this call reads and extends. position_ids are not
        used (ALiBi reads distances on the key axis) and are refused rather than ignored."""
        if position_ids is not None:
            raise ConfigError("BLOOM has no position ids (ALiBi penalises distances between tokens); pass none")
        cache = past_key_values
        past = cache_length(cache)
        check_ids(input_ids, vocab_size=self.config.vocab_size, max_length=self.max_length())
        b, s = input_ids.shape
        mask = check_mask(attention_mask, (b, past + s), "(batch, cached + new tokens)", input_ids.device)
        batch = Batch(mask, (b, s), self.backend, causal=True, cache=cache, probs=output_attentions,
                      variants=self.variants)

        x = self.embed_norm(self.embed(batch.pack(input_ids)))                  # (B, S, H), or (1, T, H) packed
        attentions = []
        for layer in self.layers:
            x, probs = layer(x, batch)
            attentions.append(probs)
        x = self.final_norm(x)

        if last_only:
            x = batch.unpack(x)[:, -1:]                                          # left padding: the last column is real
            logits = self.lm_head(x) if self.lm_head is not None else None
        else:
            logits = batch.unpack(self.lm_head(x)) if self.lm_head is not None else None
            x = batch.unpack(x)
        return Output(x, logits, attentions=tuple(attentions) if output_attentions else None, past_key_values=cache)
