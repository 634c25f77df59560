"""BERT (Devlin et al., 2019): embeddings, post-LN encoder layers, the pooler and the heads.

RoBERTa and DistilBERT (roberta.py, distilbert.py) reuse all of it and say only what differs. Shape legend in
minibt/attention/__init__.py. Between the entry and the exit the batch may be packed, (1, T, H): the real tokens of
every row back to back (models/common.py TokenLayout decides, once per forward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import Fields
from .common import ACTIVATIONS, Model, Output, TokenLayout, activation, check_inputs


# ------------------------------------------------------------------------------------------------------ config

@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_positions: int = 512
    type_vocab_size: int = 2                 # 0: no token-type embeddings (DistilBERT)
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    mlm_act: str | None = None               # activation of the masked-LM transform; None: hidden_act
    tie_word_embeddings: bool = True
    num_labels: int = 2

    @classmethod
    def from_hf(cls, c: dict, where: str = "config.json") -> "BertConfig":
        f = Fields(c, where)
        f.str("position_embedding_type", "absolute", choices=("absolute",))
        cfg = cls(vocab_size=f.int("vocab_size"), hidden_size=f.int("hidden_size"),
                  num_layers=f.int("num_hidden_layers", min=0), num_heads=f.int("num_attention_heads"),
                  intermediate_size=f.int("intermediate_size"),
                  hidden_act=f.str("hidden_act", "gelu", choices=tuple(ACTIVATIONS)),
                  max_positions=f.int("max_position_embeddings", 512), type_vocab_size=f.int("type_vocab_size", 2),
                  layer_norm_eps=f.float("layer_norm_eps", 1e-12, positive=True),
                  pad_token_id=f.int("pad_token_id", 0, min=0, none_ok=True) or 0,
                  tie_word_embeddings=f.bool("tie_word_embeddings", True), num_labels=f.labels())
        f.divides("hidden_size", "num_attention_heads", cfg.hidden_size, cfg.num_heads)
        return cfg


# ------------------------------------------------------------------------------------------------------ blocks

class Embeddings(nn.Module):
    """word + position (+ token type), then LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids, types, positions):
        x = self.word(ids) + self.position(positions)
        if self.token_type is not None:
            x = x + self.token_type(types)
        return self.norm(x)


class SelfAttention(nn.Module):
    """softmax(q k^T / sqrt(D)) v over every head, through the bound attention function `attend`."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)                  # query, key, value in one matmul (weights_map `fuse`)
        self.out = nn.Linear(h, h)

    def forward(self, x, mask, attend):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, Hq, S, D)
        a = attend(q, k, v, mask=mask, scale=self.head_dim ** -0.5)                               # (B, Hq, S, D)
        return self.out(a.transpose(1, 2).reshape(b, s, h))                                       # (B, S, H)


class MLP(nn.Module):
    """up -> activation -> down."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act, "hidden_act")
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class EncoderLayer(nn.Module):
    """Post-LN: x = norm1(x + attention(x)); x = norm2(x + mlp(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, mask, attend):
        x = self.norm1(x + self.attention(x, mask, attend))
        return self.norm2(x + self.mlp(x))


class Encoder(nn.ModuleList):
    """The layer stack: x -> layer 1 -> ... -> layer N."""

    def forward(self, x, mask, attend):
        for layer in self:
            x = layer(x, mask, attend)
        return x


# ------------------------------------------------------------------------------------------------------ heads

class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder (tied to the word embeddings) + bias."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.mlm_act or cfg.hidden_act, "hidden_act")
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.empty(cfg.vocab_size))

    def forward(self, x):
        return self.decoder(self.norm(self.act(self.dense(x)))) + self.bias


class ClassifierHead(nn.Module):
    """On the first token: [dense -> act ->] out. BERT's dense + tanh is its pooler, so it has none here."""

    def __init__(self, cfg: BertConfig, act: str | None):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size) if act else None
        self.act = {"tanh": torch.tanh, "relu": torch.relu}.get(act)
        self.out = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, first, pooled):
        return self.out(pooled if self.dense is None else self.act(self.dense(first)))


# ------------------------------------------------------------------------------------------------------ model

class Bert(Model):
    family = "bert"
    config_class = BertConfig
    head_kinds = ("base", "masked-lm", "sequence-classification")
    has_pooler = True
    classifier_act: str | None = None               # RoBERTa: tanh, DistilBERT: relu (they have no pooler)

    def __init__(self, cfg: BertConfig, head: str = "base", pooler: bool = True):
        super().__init__()
        self.config, self.head = cfg, head
        self.embeddings = Embeddings(cfg)
        self.layers = Encoder(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if pooler else None
        self.mlm = MaskedLMHead(cfg) if head == "masked-lm" else None
        classify = head == "sequence-classification"
        self.classifier = ClassifierHead(cfg, self.classifier_act) if classify else None
        self.set_attention("auto")

    @classmethod
    def from_hf(cls, config: dict, head: str, keys: set, where: str = "config.json"):
        cfg = cls.config_class.from_hf(config, where)
        pooler = cls.has_pooler and any(k.startswith("pooler.") for k in keys)
        return cls(cfg, head, pooler=pooler or (head == "sequence-classification" and cls.classifier_act is None))

    def tied(self):
        return {"mlm.decoder.weight": "embeddings.word.weight"} if self.mlm and self.config.tie_word_embeddings else {}

    def max_length(self):
        return self.config.max_positions

    def position_ids(self, input_ids):
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_attentions=False) -> Output:
        attention_mask = check_inputs(input_ids, attention_mask, vocab_size=self.config.vocab_size,
                                      max_length=self.max_length())
        token_type_ids = self.check_token_types(input_ids, token_type_ids)
        positions = self.position_ids(input_ids)
        backend, attend, probs = self.bind(attention_mask, output_attentions)
        layout = TokenLayout(attention_mask, input_ids.shape, packed=backend.packed, causal=False)
        x = self.embeddings(layout.pack(input_ids), layout.pack(token_type_ids), layout.pack(positions))
        x = self.layers(x, layout.mask, attend)                              # (B, S, H), or (1, T, H) packed
        logits = layout.unpack(self.mlm(x)) if self.mlm is not None else None
        x = layout.unpack(x)                                                  # (B, S, H), exactly 0 at padding
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        if self.classifier is not None:
            logits = self.classifier(x[:, 0], pooled)
        return Output(x, logits, pooled, tuple(probs) if probs is not None else None)
