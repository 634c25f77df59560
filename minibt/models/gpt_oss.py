"""gpt-oss (OpenAI, 2025) = Llama's attention with sinks, and a mixture of experts instead of its MLP.

- attention: biases on q, k, v and out; a learned sink logit per head (an extra term in the softmax's denominator
  whose weight is dropped: the head may attend to nothing); sliding windows of 128 keys on every other layer
  (`layer_types`; rolling KV cache); RoPE with YaRN scaling (models/llama.py).
- the MoE block (its own code, below): a linear router picks the top-k experts of each token, their softmax weights
  mix the experts' outputs; each expert is a clamped SwiGLU, (up + 1) * gate * sigmoid(alpha * gate) with gate
  clamped above and up clamped to ±limit. Experts run one batched matmul each over the tokens routed to them.
- RMSNorm multiplies by its weight in fp32 before rounding (Llama rounds first).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import Fields
from .llama import Attention, Llama, LlamaConfig, LlamaLayer, RMSNorm


@dataclass
class GptOssConfig(LlamaConfig):
    num_experts: int = 32
    experts_per_token: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @classmethod
    def from_hf(cls, c: dict, where: str = "config.json") -> "GptOssConfig":
        f = Fields(c, where)
        base = LlamaConfig.from_hf(c, where)
        cfg = cls(**vars(base), num_experts=f.int("num_local_experts"), experts_per_token=f.int("num_experts_per_tok"),
                  swiglu_alpha=f.float("swiglu_alpha", 1.702, positive=True),
                  swiglu_limit=f.float("swiglu_limit", 7.0, positive=True))
        if cfg.experts_per_token > cfg.num_experts:
            f.fail("num_experts_per_tok", cfg.experts_per_token, f"exceeds num_local_experts = {cfg.num_experts}")
        return cfg


class GptOssRMSNorm(RMSNorm):
    """x / sqrt(mean(x^2) + eps) * weight, all in fp32, then x's dtype."""

    def forward(self, x):
        h = x.float()
        return (self.weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


class GptOssAttention(Attention):
    def __init__(self, cfg: GptOssConfig, index: int):
        super().__init__(cfg, index)
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads))        # one logit per query head

    def variants(self) -> dict:
        return {**super().variants(), "sinks": self.sinks}


class Experts(nn.Module):
    """Top-k routing over `num_experts` clamped-SwiGLU experts. The weights keep the checkpoint's layout:
    gate_up (E, H, 2I) with gate and up interleaved along the last axis, down (E, I, H)."""

    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.k, self.alpha, self.limit = cfg.experts_per_token, cfg.swiglu_alpha, cfg.swiglu_limit
        self.router = nn.Linear(h, e)
        self.gate_up = nn.Parameter(torch.empty(e, h, 2 * i))
        self.gate_up_bias = nn.Parameter(torch.empty(e, 2 * i))
        self.down = nn.Parameter(torch.empty(e, i, h))
        self.down_bias = nn.Parameter(torch.empty(e, h))

    def expert(self, e: int, x):
        """Expert e on its tokens x (N_e, H) -> (N_e, H)."""
        h = x @ self.gate_up[e] + self.gate_up_bias[e]                             # (N_e, 2I)
        gate, up = h[..., ::2].clamp(max=self.limit), h[..., 1::2].clamp(-self.limit, self.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * self.alpha)) @ self.down[e] + self.down_bias[e]

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                 # (N, H)
        top, chosen = self.router(x).topk(self.k, dim=-1)                            # (N, k) logits, expert ids
        weights = top.softmax(-1)                                                    # over the chosen experts
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():                                           # each expert some token chose
            tokens, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, tokens, (self.expert(e, x[tokens]) * weights[tokens, slot, None]).to(x.dtype))
        return out.view(shape)


class GptOssLayer(LlamaLayer):
    attention_class = GptOssAttention

    def __init__(self, cfg: GptOssConfig, index: int):
        super().__init__(cfg, index)
        self.norm1 = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Experts(cfg)


class GptOss(Llama):
    family = "gpt-oss"
    config_from_hf = staticmethod(GptOssConfig.from_hf)
    layer_class = GptOssLayer

    def __init__(self, cfg: GptOssConfig, head: str = "causal-lm"):
        super().__init__(cfg, head)
        self.norm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
