"""BERT: embeddings, post-LN encoder layers, optional pooler and heads. RoBERTa and DistilBERT reuse all of it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackendError, ConfigError
from .common import Batch, Model, Output, activation, check_inputs


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
    mlm_act: str | None = None               # MLM transform activation; None: hidden_act
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, c: dict) -> "BertConfig":
        kind = c.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConfigError(f"config.json position_embedding_type={kind!r}: only 'absolute' is implemented")
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c["intermediate_size"], c.get("hidden_act", "gelu"), c.get("max_position_embeddings", 512),
                   c.get("type_vocab_size", 2), c.get("layer_norm_eps", 1e-12), c.get("pad_token_id", 0) or 0,
                   tie_word_embeddings=c.get("tie_word_embeddings", True))


class Embeddings(nn.Module):
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


class EncoderLayer(nn.Module):
    """Post-LN: x = norm1(x + attention(x)); x = norm2(x + ffn(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)                  # query, key, value in one matmul (weights_map `fuse`)
        self.out = nn.Linear(h, h)
        self.norm1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act, "hidden_act")
        self.down = nn.Linear(cfg.intermediate_size, h)
        self.norm2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x, mask, attend):
        q, k, v = self.project(x)
        return self.finish(x, attend(q, k, v, mask=mask, scale=self.head_dim ** -0.5))

    # project and finish hold every matmul; torch.compile takes them whole (Bert.compile_layers), while the
    # attention call between them, with its data-dependent masks and sequence bounds, stays eager.
    def project(self, x):
        b, s, _ = x.shape
        return self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)     # 3 x (B, Hq, S, D)

    def finish(self, x, a):
        b, s, h = x.shape
        x = self.norm1(x + self.out(a.transpose(1, 2).reshape(b, s, h)))                        # (B, S, H)
        return self.norm2(x + self.down(self.act(self.up(x))))


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

    def __init__(self, cfg: BertConfig, num_labels: int, act: str | None):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size) if act else None
        self.act = {"tanh": torch.tanh, "relu": torch.relu}.get(act)
        self.out = nn.Linear(cfg.hidden_size, num_labels)

    def forward(self, first, pooled):
        return self.out(pooled if self.dense is None else self.act(self.dense(first)))


class Bert(Model):
    family = "bert"
    config_class = BertConfig
    heads = ("base", "masked-lm", "sequence-classification")
    has_pooler = True
    classifier_act: str | None = None               # RoBERTa: tanh, DistilBERT: relu (they have no pooler)

    def __init__(self, cfg: BertConfig, head: str = "base", pooler: bool = True, num_labels: int = 2):
        super().__init__()
        self.config, self.head = cfg, head
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if pooler else None
        self.mlm = MaskedLMHead(cfg) if head == "masked-lm" else None
        self.classifier = ClassifierHead(cfg, num_labels, self.classifier_act) if head == "sequence-classification" else None
        self.set_attention("auto")

    @classmethod
    def from_hf(cls, config: dict, head: str, keys: set):
        cfg = cls.config_class.from_hf(config)
        pooler = cls.has_pooler and any(k.startswith("pooler.") for k in keys)
        return cls(cfg, head, pooler=pooler or (head == "sequence-classification" and cls.classifier_act is None),
                   num_labels=len(config.get("id2label", {})) or config.get("num_labels", 2))

    def tied(self):
        return {"mlm.decoder.weight": "embeddings.word.weight"} if self.mlm and self.config.tie_word_embeddings else {}

    def max_length(self):
        return self.config.max_positions

    def position_ids(self, input_ids, attention_mask):
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def compile_layers(self):
        """torch.compile the dense half-layers (all matmuls, norms, activations); returns the model.
        Works with every backend but `fused`; shapes are dynamic, so new batch sizes and lengths do not recompile."""
        for layer in self.layers:
            layer.project = torch.compile(layer.project, dynamic=True)
            layer.finish = torch.compile(layer.finish, dynamic=True)
        return self

    def set_attention(self, name: str):
        self.fused = None
        if name == "fused":
            from ..kernels.fused_encoder import FusedEncoder
            self.fused = FusedEncoder(self)             # checks it can run this model exactly; raises if not
            super().set_attention("varlen")             # the fused stack runs on the packed tokens
            self.attn = "fused"
            return self
        return super().set_attention(name)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_attentions=False) -> Output:
        check_inputs(input_ids, attention_mask, vocab_size=self.config.vocab_size, max_length=self.max_length())
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = self.position_ids(input_ids, attention_mask)
        backend = self.route(attention_mask, output_attentions)
        attend, probs = self.bind(backend, output_attentions)
        batch = Batch(attention_mask, input_ids.shape, packed=backend.packed, causal=False)
        x = self.embeddings(batch.pack(input_ids), batch.pack(token_type_ids), batch.pack(positions))
        if self.fused is not None:
            if output_attentions:
                raise BackendError("attn='fused' cannot return attention probabilities; use 'naive' or 'auto'")
            x = self.fused(x, batch.mask)                # BetterTransformer fastpath: each layer is one fused op
        else:
            for layer in self.layers:
                x = layer(x, batch.mask, attend)
        logits = batch.unpack(self.mlm(x)) if self.mlm is not None else None
        x = batch.unpack(x)                                                   # (B, S, H)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        if self.classifier is not None:
            logits = self.classifier(x[:, 0], pooled)
        return Output(x, logits, pooled, tuple(probs) if probs is not None else None)
