"""NomicBERT (Nussbaum et al., 2024; nomic-embed-text v1 / v1.5): BERT's post-LN encoder with rotary positions and
a SwiGLU MLP, 2048 trained positions. What differs from BERT (models/bert.py):

- No position table: RoPE on q and k (rotate-half layout, over the whole head, theta 1000), positions 0..S-1 of
  every row as transformers numbers them. Llama's helper applies it, ModernBERT's computes the tables.
- No biases in the q/k/v, output and MLP projections (the LayerNorms keep theirs).
- The MLP is SwiGLU: down(silu(gate(x)) * up(x)); the checkpoint's fc12 is the gate, fc11 the input.
- Embeddings are word + token type (no positions), then LayerNorm (`emb_ln`, outside `embeddings.` in the checkpoint).
- No pooler unless the checkpoint has one (NomicBertForSequenceClassification's: dense + tanh on the first token).
BERT's masked-LM head and classifier are reused as they are. Shape legend in minibt/attention/__init__.py.

config.json: transformers 5 names (hidden_size, rope_parameters, ...). The hub checkpoints' config.json was written
for nomic's own code (n_embd, rotary_emb_base, ...; v1.5's now carries both): nomic's name is read where the
transformers one is absent, and where both are given they must agree (but nomic's n_positions, the context served,
wins over max_position_embeddings, the trained one). Nomic options that transformers' NomicBERT does not compute
(partial or interleaved rotary, pre-LN, biases, RMSNorm, parallel blocks, scaled rotary, unscaled scores,
nomic-embed-text-v2-moe's experts) are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attention import Batch, check_ids, check_mask
from ..config import Fields
from .bert import ClassifierHead, EncoderLayer, MaskedLMHead, check_token_types
from .common import ACTIVATIONS, Model, Output, activation
from .llama import apply_rope
from .modernbert import rope_tables


# ------------------------------------------------------------------------------------------------------ config

# transformers 5 name -> the name nomic's own config.json (the hub checkpoints') gives the same field
NOMIC_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
               "intermediate_size": "n_inner", "layer_norm_eps": "layer_norm_epsilon"}

# nomic options transformers' NomicBERT does not compute -> the one value it implies (absent: that value too)
NOMIC_FIXED = {"num_experts": 0, "moe_every_n_layers": 0,          # nomic-embed-text-v2-moe: a mixture of experts
               "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False, "rotary_emb_scale_base": None,
               "rotary_scaling_factor": None, "prenorm": False, "parallel_block": False, "use_rms_norm": False,
               "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "causal": False,
               "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}


@dataclass
class NomicBertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    hidden_act: str = "silu"                 # the MLP's gate activation (SwiGLU: silu)
    max_positions: int = 2048
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    rope_theta: float = 1000.0
    tie_word_embeddings: bool = True
    num_labels: int = 2
    add_pooling_layer: bool = True           # false for checkpoints saved without one (weights_map: [absent])
    mlm_act: str | None = None               # BERT's MaskedLMHead reads it: None = hidden_act

    @classmethod
    def from_hf(cls, c: dict, where: str = "config.json") -> "NomicBertConfig":
        f = Fields(c, where)
        for key, value in NOMIC_FIXED.items():
            if key in c and c[key] != value:
                f.fail(key, c[key], f"is not supported: minibt computes NomicBERT as transformers does "
                                    f"({key} = {value!r})")

        def name(key):
            """The field to read: the transformers name, or nomic's when only that one is given."""
            nomic = NOMIC_NAMES[key]
            if c.get(key) is None:
                return nomic if c.get(nomic) is not None else key
            if c.get(nomic) is not None and c[nomic] != c[key]:
                f.fail(nomic, c[nomic], f"disagrees with {key} = {c[key]!r}")
            return key

        act = f.str("hidden_act", "silu", choices=tuple(ACTIVATIONS))
        if c.get("activation_function") is not None:                  # nomic's name: swiglu, the gated silu
            f.str("activation_function", choices=("swiglu",))
            if act != "silu":
                f.fail("activation_function", "swiglu", f"disagrees with hidden_act = {act!r}")
        rope = Fields(f.dict("rope_parameters"), f"{where} rope_parameters")
        rope.str("rope_type", "default", choices=("default",))
        base = f.float("rotary_emb_base", 1000.0, positive=True)       # nomic's name for the theta
        theta = rope.float("rope_theta", f.float("rope_theta", base, positive=True), positive=True)
        if "rotary_emb_base" in c and theta != base:
            f.fail("rotary_emb_base", c["rotary_emb_base"], f"disagrees with the rope theta {theta}")

        hidden, heads = f.int(name("hidden_size")), f.int(name("num_attention_heads"))
        cfg = cls(vocab_size=f.int("vocab_size"), hidden_size=hidden, num_layers=f.int(name("num_hidden_layers"),
                                                                                        min=0),
                  num_heads=heads, head_dim=f.int("head_dim", None, none_ok=True) or hidden // heads,
                  intermediate_size=f.int(name("intermediate_size")), hidden_act=act,
                  # nomic's n_positions (8192 in v1.5, trained on 2048) states the context it serves;
                  # transformers' RoPE has no table to run out of, so it wins over max_position_embeddings
                  max_positions=f.int("n_positions") if c.get("n_positions") is not None
                  else f.int("max_position_embeddings", 2048),
                  type_vocab_size=f.int("type_vocab_size", 2),
                  layer_norm_eps=f.float(name("layer_norm_eps"), 1e-12, positive=True), rope_theta=theta,
                  tie_word_embeddings=f.bool("tie_word_embeddings", True), num_labels=f.labels(),
                  add_pooling_layer=f.bool("add_pooling_layer", True))
        if c.get("head_dim") is None:
            f.divides(name("hidden_size"), name("num_attention_heads"), hidden, heads)
        if cfg.head_dim % 2:
            f.fail("head_dim", cfg.head_dim, "must be even for rotary embeddings")
        return cfg


# ------------------------------------------------------------------------------------------------------ blocks

class Embeddings(nn.Module):
    """word + token type, then LayerNorm (no positions: RoPE in every layer instead)."""

    def __init__(self, cfg: NomicBertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids, types):
        return self.norm(self.word(ids) + self.token_type(types))


class Attention(nn.Module):
    """Bidirectional softmax(q k^T / sqrt(D)) v, with RoPE on q and k; no biases."""

    def __init__(self, cfg: NomicBertConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * inner, bias=False)   # q, k, v in one matmul (Wqkv)
        self.out = nn.Linear(inner, cfg.hidden_size, bias=False)

    def forward(self, x, batch: Batch):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).unbind(2)  # 3 x (B, S, Hq, D)
        q, k = (apply_rope(t, *batch.rope).transpose(1, 2) for t in (q, k))           # (B, Hq, S, D)
        a, probs = batch.attend(q, k, v.transpose(1, 2), scale=self.head_dim ** -0.5)
        return self.out(a.transpose(1, 2).reshape(b, s, -1)), probs                   # (B, S, H)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), gate and up in one matmul (gate first); no biases."""

    def __init__(self, cfg: NomicBertConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.act = activation(cfg.hidden_act, "hidden_act")
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class NomicBertLayer(EncoderLayer):
    """BERT's post-LN layer, x = norm1(x + attention(x)); x = norm2(x + mlp(x)), with the blocks above."""
    attention_class, mlp_class = Attention, MLP


# ------------------------------------------------------------------------------------------------------ model

class NomicBert(Model):
    family = "nomic_bert"
    config_from_hf = staticmethod(NomicBertConfig.from_hf)
    head_kinds = ("base", "masked-lm", "sequence-classification")

    def __init__(self, cfg: NomicBertConfig, head: str = "base"):
        super().__init__()
        self.config, self.head = cfg, head
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(NomicBertLayer(cfg) for _ in range(cfg.num_layers))
        classify = head == "sequence-classification"
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if cfg.add_pooling_layer or classify else None
        self.mlm = MaskedLMHead(cfg) if head == "masked-lm" else None
        self.classifier = ClassifierHead(cfg, None) if classify else None          # reads the pooler's output

    def tied(self):
        return {"mlm.decoder.weight": "embeddings.word.weight"} if self.mlm and self.config.tie_word_embeddings else {}

    def max_length(self):
        return self.config.max_positions

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_attentions=False) -> Output:
        check_ids(input_ids, vocab_size=self.config.vocab_size, max_length=self.max_length())
        mask = check_mask(attention_mask, input_ids.shape, device=input_ids.device)
        token_type_ids = check_token_types(token_type_ids, input_ids, self.config.type_vocab_size)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        batch = Batch(mask, input_ids.shape, self.backend, probs=output_attentions, variants=self.variants)

        x = self.embeddings(batch.pack(input_ids), batch.pack(token_type_ids))  # (B, S, H), or (1, T, H) packed
        batch.rope = rope_tables(batch.pack(positions), self.config.rope_theta, self.config.head_dim, x.dtype)
        attentions = []
        for layer in self.layers:
            x, probs = layer(x, batch)
            attentions.append(probs)

        logits = batch.unpack(self.mlm(x)) if self.mlm is not None else None
        x = batch.unpack(x)                                                    # (B, S, H), exactly 0 at padding
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        if self.classifier is not None:
            logits = self.classifier(x[:, 0], pooled)
        return Output(x, logits, pooled, tuple(attentions) if output_attentions else None)
