"""MPNet (Song et al., 2020) = RoBERTa's encoder (positions from padding_idx + 1, no token types, the same heads) with
one difference in attention: a relative-position bias, score[h, i, j] += table[bucket(j - i), h], from one table of
(buckets, heads) that every layer shares (T5's bidirectional buckets: exact up to 8 positions, logarithmic to 128).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..attention import Batch, RelativeBias
from ..config import Fields
from .bert import BertConfig
from .roberta import Roberta, roberta_config

BUCKETS = 32            # the bucket function's own count (MPNet computes with 32 whatever the config says)
MAX_DISTANCE = 128


@dataclass
class MPNetConfig(BertConfig):
    relative_buckets: int = 32


def mpnet_config(c: dict, where: str = "config.json") -> MPNetConfig:
    f = Fields(c, where)
    base = roberta_config(c, where)
    return MPNetConfig(**vars(replace(base, type_vocab_size=0)),
                       relative_buckets=f.int("relative_attention_num_buckets", 32))


def mpnet_bucket(distance: torch.Tensor) -> torch.Tensor:
    """Signed distance key - query -> bucket: half the buckets for keys after the query; within a half, distances
    below 8 exact, then logarithmic up to 128, the last bucket beyond."""
    half = BUCKETS // 2
    exact = half // 2
    n = distance.abs()
    large = exact + (torch.log(n.float() / exact) / math.log(MAX_DISTANCE / exact) * (half - exact)).to(torch.long)
    return (distance > 0).long() * half + torch.where(n < exact, n, large.clamp(max=half - 1))


class MPNet(Roberta):
    family = "mpnet"
    config_from_hf = staticmethod(mpnet_config)
    variants = frozenset({"relative"})              # every layer's attention: the shared relative-position bias

    def __init__(self, cfg: MPNetConfig, head: str = "base"):
        super().__init__(cfg, head)
        self.relative_bias = nn.Embedding(cfg.relative_buckets, cfg.num_heads)      # (buckets, Hq), all layers

    def make_batch(self, mask, shape, probs: bool) -> Batch:
        batch = super().make_batch(mask, shape, probs)
        batch.relative = RelativeBias(self.relative_bias.weight, mpnet_bucket)
        return batch
