"""BERT (Devlin et al., 2019): embeddings, post-LN encoder layers, the pooler and the heads.

RoBERTa and DistilBERT (roberta.py, distilbert.py) reuse all of it and say only what differs. Shape legend in
minibt/attention/__init__.py. Between the entry and the exit the batch may be packed, (1, T, H): the real tokens of
every row back to back (the forward's `Batch`, attention/batch.py, decides once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attention import INT_DTYPES, Batch, check_ids, check_mask
from ..config import Fields
from ..errors import InputError
from .common import ACTIVATIONS, Model, Output, activation


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
    add_pooling_layer: bool = True           # false for checkpoints saved without one (weights_map: [absent])

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
                  tie_word_embeddings=f.bool("tie_word_embeddings", True), num_labels=f.labels(),
                  add_pooling_layer=f.bool("add_pooling_layer", True))
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

    def forward(self, x, batch: Batch):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, Hq, S, D)
        # batch.relative: the relative-position table all layers share (MPNet), None for BERT
        a, probs = batch.attend(q, k, v, scale=self.head_dim ** -0.5, relative=batch.relative)   # (B, Hq, S, D)
        return self.out(a.transpose(1, 2).reshape(b, s, h)), probs                                # (B, S, H)


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
    attention_class, mlp_class = SelfAttention, MLP          # a relative's own blocks (nomic_bert.py)

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = self.attention_class(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = self.mlp_class(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, batch: Batch):
        a, probs = self.attention(x, batch)
        x = self.norm1(x + a)
        return self.norm2(x + self.mlp(x)), probs


class LayerStack(nn.ModuleList):
    """x -> layer 1 -> ... -> layer N; -> (x, each layer's probabilities or None). A module of its own so that a
    kernels/ transform can replace the whole stack at once."""

    def forward(self, x, batch: Batch):
        attentions = []
        for layer in self:
            x, probs = layer(x, batch)
            attentions.append(probs)
        return x, attentions


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
    config_from_hf = staticmethod(BertConfig.from_hf)
    head_kinds = ("base", "masked-lm", "sequence-classification")
    classifier_act: str | None = None               # RoBERTa: tanh, DistilBERT: relu (they have no pooler)

    def __init__(self, cfg: BertConfig, head: str = "base"):
        super().__init__()
        self.config, self.head = cfg, head
        self.embeddings = Embeddings(cfg)
        self.layers = LayerStack(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        classify = head == "sequence-classification"
        pooled = cfg.add_pooling_layer or (classify and self.classifier_act is None)   # BERT's classifier reads it
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if pooled else None
        self.mlm = MaskedLMHead(cfg) if head == "masked-lm" else None
        self.classifier = ClassifierHead(cfg, self.classifier_act) if classify else None

    def tied(self):
        return {"mlm.decoder.weight": "embeddings.word.weight"} if self.mlm and self.config.tie_word_embeddings else {}

    def max_length(self):
        return self.config.max_positions

    def position_ids(self, input_ids):
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def make_batch(self, mask, shape, probs: bool) -> Batch:
        """The forward's Batch (MPNet adds its shared relative-position table to it)."""
        return Batch(mask, shape, self.backend, probs=probs, variants=self.variants)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_attentions=False) -> Output:
        check_ids(input_ids, vocab_size=self.config.vocab_size, max_length=self.max_length())
        mask = check_mask(attention_mask, input_ids.shape, device=input_ids.device)
        token_type_ids = check_token_types(token_type_ids, input_ids, self.config.type_vocab_size)
        positions = self.position_ids(input_ids)
        batch = self.make_batch(mask, input_ids.shape, output_attentions)

        x = self.embeddings(batch.pack(input_ids), batch.pack(token_type_ids), batch.pack(positions))
        x, attentions = self.layers(x, batch)                                 # (B, S, H), or (1, T, H) packed

        logits = batch.unpack(self.mlm(x)) if self.mlm is not None else None
        x = batch.unpack(x)                                                   # (B, S, H), exactly 0 at padding
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        if self.classifier is not None:
            logits = self.classifier(x[:, 0], pooled)
        return Output(x, logits, pooled, tuple(attentions) if output_attentions else None)


def check_token_types(token_type_ids, input_ids, type_vocab_size: int):
    """token_type_ids: zeros when absent; else integer, input_ids' shape, below type_vocab_size."""
    types = max(type_vocab_size, 1)
    if token_type_ids is None:
        return torch.zeros_like(input_ids)
    if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.dtype not in INT_DTYPES:
        raise InputError("token_type_ids must be an integer tensor")
    if tuple(token_type_ids.shape) != tuple(input_ids.shape):
        raise InputError(f"token_type_ids shape {tuple(token_type_ids.shape)} does not match input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if token_type_ids.numel() and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= types):
        raise InputError(f"token_type_ids must be in [0, {types}) (type_vocab_size={type_vocab_size} in "
                         f"config.json), found {int(token_type_ids.max())}")
    return token_type_ids
