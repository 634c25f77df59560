"""Gemma 2 (Gemma Team, 2024) = Llama with these differences, each said here:

- attention: scores scaled by query_pre_attn_scalar^-1/2 (not head_dim^-1/2) and soft-capped,
  c * tanh(s / c) with c = attn_logit_softcapping (50); local layers (a sliding window of 4096) alternating with
  global ones (`layer_types`, read by Llama's config reader; local layers keep a rolling KV cache);
- layers: a norm before and after attention and before and after the MLP (four per layer), each an RMSNorm that
  multiplies by (1 + weight), in fp32;
- the MLP: GeGLU (gelu with the tanh approximation, `hidden_activation`);
- embeddings multiplied by sqrt(hidden_size), that factor rounded to the weights' dtype first (as the reference
  does: 55.5 rather than 55.4256 in bf16); final logits soft-capped at final_logit_softcapping (30);
- the LM head tied to the embeddings by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Fields
from ..errors import ConfigError
from .common import ACTIVATIONS
from .llama import Attention, Llama, LlamaConfig, LlamaLayer, RMSNorm


@dataclass
class Gemma2Config(LlamaConfig):
    query_pre_attn_scalar: float = 256.0
    attn_softcap: float | None = 50.0
    final_softcap: float | None = 30.0

    @classmethod
    def from_hf(cls, c: dict, where: str = "config.json") -> "Gemma2Config":
        f = Fields(c, where)
        if f.c.get("use_bidirectional_attention"):
            f.fail("use_bidirectional_attention", True, "is not supported (an encoder use of Gemma); minibt runs "
                   "Gemma 2 as a causal LM")
        act = f.str("hidden_activation", "gelu_pytorch_tanh", choices=tuple(ACTIVATIONS))
        base = LlamaConfig.from_hf({**c, "hidden_act": act, "tie_word_embeddings": f.bool("tie_word_embeddings", True)},
                                   where)
        softcaps = [f.c.get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping")]
        for key, value in zip(("attn_logit_softcapping", "final_logit_softcapping"), softcaps):
            if value is not None:
                f.float(key, positive=True)
        cfg = cls(**vars(base), query_pre_attn_scalar=f.float("query_pre_attn_scalar", 256.0, positive=True),
                  attn_softcap=softcaps[0], final_softcap=softcaps[1])
        if cfg.head_dim % 2:
            raise ConfigError(f"{where}: head_dim = {cfg.head_dim} must be even for rotary embeddings")
        return cfg


class Gemma2RMSNorm(RMSNorm):
    """x / sqrt(mean(x^2) + eps) * (1 + weight), all in fp32, then x's dtype (the weight is stored as an offset)."""

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class Gemma2Attention(Attention):
    def __init__(self, cfg: Gemma2Config, index: int):
        super().__init__(cfg, index)
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_softcap

    def variants(self) -> dict:
        return {**super().variants(), "softcap": self.softcap}        # c * tanh(s / c) on every score


class Gemma2Layer(LlamaLayer):
    """x = x + post_attn_norm(attention(norm1(x))); x = x + post_mlp_norm(mlp(norm2(x)))."""

    attention_class = Gemma2Attention

    def __init__(self, cfg: Gemma2Config, index: int):
        super().__init__(cfg, index)
        for name in ("norm1", "norm2", "post_attn_norm", "post_mlp_norm"):
            setattr(self, name, Gemma2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, x, batch):
        a, probs = self.attention(self.norm1(x), batch)
        x = x + self.post_attn_norm(a)
        return x + self.post_mlp_norm(self.mlp(self.norm2(x))), probs


class Gemma2(Llama):
    family = "gemma2"
    config_from_hf = staticmethod(Gemma2Config.from_hf)
    layer_class = Gemma2Layer

    def __init__(self, cfg: Gemma2Config, head: str = "causal-lm"):
        super().__init__(cfg, head)
        self.norm = Gemma2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embeddings(self, ids):
        x = self.embed(ids)
        return x * torch.tensor(self.config.hidden_size ** 0.5).to(x.dtype)

    def logits(self, x):
        logits, cap = self.lm_head(x), self.config.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)
