"""ModernBERT (Warner et al., 2024): a pre-LN encoder with rotary positions, local and global attention layers,
a GeGLU MLP, LayerNorms without bias and no biases in the linear layers, 8192 positions.

- Every third layer (global_attn_every_n_layers) attends to the whole sequence; the others attend within a
  bidirectional window of ±local_attention / 2 = ±64 tokens (the layer's attention variant: window (64, 64)).
- RoPE with another theta for each kind of layer (global 160,000, local 10,000), on positions 0.. of each row.
- Layer 0 has no norm before its attention (the embeddings' LayerNorm just ran).
Textbook maths only; shape legend in minibt/attention/__init__.py. RoPE's helpers are Llama's (rotate-half layout).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention import Batch, check_ids, check_mask
from ..config import Fields
from .common import ACTIVATIONS, Model, Output, activation
from .llama import apply_rope


# ------------------------------------------------------------------------------------------------------ config

@dataclass
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_positions: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    layer_types: list = field(default_factory=list)          # "full_attention" / "sliding_attention" per layer
    local_window: int = 64                                    # a local layer sees keys within ±local_window
    theta: dict = field(default_factory=lambda: {"full_attention": 160000.0, "sliding_attention": 10000.0})
    classifier_pooling: str = "cls"
    classifier_act: str = "gelu"
    classifier_bias: bool = False
    decoder_bias: bool = True
    tie_word_embeddings: bool = True
    num_labels: int = 2

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, c: dict, where: str = "config.json") -> "ModernBertConfig":
        f = Fields(c, where)
        layers = f.int("num_hidden_layers", min=0)
        every = f.int("global_attn_every_n_layers", 3)
        types = f.c.get("layer_types") or ["sliding_attention" if i % every else "full_attention"
                                           for i in range(layers)]
        if not isinstance(types, list) or len(types) != layers or not set(types) <= {"full_attention",
                                                                                       "sliding_attention"}:
            f.fail("layer_types", types, f"must list {layers} of 'full_attention' / 'sliding_attention'")
        rope = f.dict("rope_parameters")
        theta = {"full_attention": f.float("global_rope_theta", 160000.0, positive=True),
                 "sliding_attention": f.float("local_rope_theta", 10000.0, positive=True)}
        for kind in theta:
            params = Fields(rope.get(kind) or {}, f"{where} rope_parameters.{kind}")
            params.str("rope_type", "default", choices=("default",))
            theta[kind] = params.float("rope_theta", theta[kind], positive=True)
        cfg = cls(vocab_size=f.int("vocab_size"), hidden_size=f.int("hidden_size"), num_layers=layers,
                  num_heads=f.int("num_attention_heads"), intermediate_size=f.int("intermediate_size"),
                  hidden_act=f.str("hidden_activation", "gelu", choices=tuple(ACTIVATIONS)),
                  max_positions=f.int("max_position_embeddings", 8192), norm_eps=f.float("norm_eps", 1e-5,
                                                                                          positive=True),
                  norm_bias=f.bool("norm_bias", False), attention_bias=f.bool("attention_bias", False),
                  mlp_bias=f.bool("mlp_bias", False), layer_types=types,
                  local_window=f.int("local_attention", 128) // 2, theta=theta,
                  classifier_pooling=f.str("classifier_pooling", "cls", choices=("cls", "mean")),
                  classifier_act=f.str("classifier_activation", "gelu", choices=tuple(ACTIVATIONS)),
                  classifier_bias=f.bool("classifier_bias", False), decoder_bias=f.bool("decoder_bias", True),
                  tie_word_embeddings=f.bool("tie_word_embeddings", True), num_labels=f.labels())
        f.divides("hidden_size", "num_attention_heads", cfg.hidden_size, cfg.num_heads)
        return cfg


def rope_tables(positions, theta: float, head_dim: int, dtype):
    """positions (B, S) -> cos, sin (B, S, D): angle position / theta^(2i/D), in fp32, then the model's dtype."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq                                       # (B, S, D/2)
    emb = torch.cat((angles, angles), dim=-1)                                               # (B, S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ------------------------------------------------------------------------------------------------------ blocks

class Attention(nn.Module):
    """Bidirectional self-attention with RoPE; a local layer sees keys within ±local_window of each query."""

    def __init__(self, cfg: ModernBertConfig, index: int):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim, self.kind = cfg.num_heads, cfg.head_dim, cfg.layer_types[index]
        local = self.kind == "sliding_attention"
        self.variants = {"window": (cfg.local_window, cfg.local_window) if local else None}
        self.qkv = nn.Linear(h, 3 * h, bias=cfg.attention_bias)
        self.out = nn.Linear(h, h, bias=cfg.attention_bias)

    def forward(self, x, batch: Batch):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).unbind(2)  # 3 x (B, S, Hq, D)
        cos, sin = batch.rope[self.kind]                                              # this kind of layer's theta
        q, k = (apply_rope(t, cos, sin).transpose(1, 2) for t in (q, k))              # (B, Hq, S, D)
        a, probs = batch.attend(q, k, v.transpose(1, 2), scale=self.head_dim ** -0.5, **self.variants)
        return self.out(a.transpose(1, 2).reshape(b, s, h)), probs                    # (B, S, H)


class MLP(nn.Module):
    """GeGLU: down(act(input) * gate), input and gate in one matmul (input first)."""

    def __init__(self, cfg: ModernBertConfig):
        super().__init__()
        self.up_gate = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act, "hidden_activation")
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        up, gate = self.up_gate(x).chunk(2, dim=-1)
        return self.down(self.act(up) * gate)


class ModernBertLayer(nn.Module):
    """Pre-LN: x = x + attention(norm1(x)); x = x + mlp(norm2(x)); layer 0 has no norm1."""

    def __init__(self, cfg: ModernBertConfig, index: int):
        super().__init__()
        norm = lambda: nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)   # noqa: E731
        self.norm1 = norm() if index else nn.Identity()
        self.attention = Attention(cfg, index)
        self.norm2 = norm()
        self.mlp = MLP(cfg)

    def forward(self, x, batch: Batch):
        a, probs = self.attention(self.norm1(x), batch)
        x = x + a
        return x + self.mlp(self.norm2(x)), probs


class Head(nn.Module):
    """dense -> act -> LayerNorm: before the MLM decoder, and before the classifier."""

    def __init__(self, cfg: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.classifier_bias)
        self.act = activation(cfg.classifier_act, "classifier_activation")
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)

    def forward(self, x):
        return self.norm(self.act(self.dense(x)))


# ------------------------------------------------------------------------------------------------------ model

class ModernBert(Model):
    family = "modernbert"
    config_from_hf = staticmethod(ModernBertConfig.from_hf)
    head_kinds = ("base", "masked-lm", "sequence-classification")

    def __init__(self, cfg: ModernBertConfig, head: str = "base"):
        super().__init__()
        self.config, self.head = cfg, head
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.layers = nn.ModuleList(ModernBertLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.head_transform = Head(cfg) if head != "base" else None
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.decoder_bias) if head == "masked-lm" \
            else None
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels) if head == "sequence-classification" else None
        self.variants = frozenset({"window"}) if "sliding_attention" in cfg.layer_types else frozenset()

    def tied(self):
        return {"decoder.weight": "embed.weight"} if self.decoder is not None and self.config.tie_word_embeddings \
            else {}

    def max_length(self):
        return self.config.max_positions

    def forward(self, input_ids, attention_mask=None, output_attentions=False) -> Output:
        check_ids(input_ids, vocab_size=self.config.vocab_size, max_length=self.max_length())
        mask = check_mask(attention_mask, input_ids.shape, device=input_ids.device)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        batch = Batch(mask, input_ids.shape, self.backend, probs=output_attentions, variants=self.variants)

        x = self.embed_norm(self.embed(batch.pack(input_ids)))                 # (B, S, H), or (1, T, H) packed
        batch.rope = {kind: rope_tables(batch.pack(positions), theta, self.config.head_dim, x.dtype)
                      for kind, theta in self.config.theta.items()}            # cos, sin for each kind of layer
        attentions = []
        for layer in self.layers:
            x, probs = layer(x, batch)
            attentions.append(probs)
        x = self.final_norm(x)

        logits = batch.unpack(self.decoder(self.head_transform(x))) if self.decoder is not None else None
        x = batch.unpack(x)                                                    # (B, S, H), exactly 0 at padding
        if self.classifier is not None:
            real = mask.unsqueeze(-1).to(x.dtype)
            pooled = x[:, 0] if self.config.classifier_pooling == "cls" else \
                (x * real).sum(1) / real.sum(1).clamp(min=1)                    # mean over real tokens
            logits = self.classifier(self.head_transform(pooled))
        return Output(x, logits, attentions=tuple(attentions) if output_attentions else None)
