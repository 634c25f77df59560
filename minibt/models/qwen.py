"""Qwen2 and Qwen3 (Qwen Team, 2024, 2025) = Llama with, each, one difference in the attention:

- Qwen2 / Qwen2.5: a bias on the q, k and v projections (none on the output projection); sliding windows on the
  layers `layer_types` marks, as Llama's config reader reads them.
- Qwen3: an RMSNorm over each head of q and of k (its own weight of head_dim) before RoPE; head_dim is explicit in
  config.json (128 in the released models, whatever hidden_size / heads is).
"""
from dataclasses import replace

import torch

from .llama import Attention, Llama, LlamaConfig, LlamaLayer, RMSNorm


def qwen2_config(c: dict, where: str = "config.json") -> LlamaConfig:
    return replace(LlamaConfig.from_hf(c, where), qkv_bias=True, out_bias=False)


class Qwen2(Llama):
    family = "qwen2"
    config_from_hf = staticmethod(qwen2_config)


class Qwen3Attention(Attention):
    """Llama's attention with q and k normalised per head (RMSNorm over head_dim) before RoPE."""

    def __init__(self, cfg: LlamaConfig, index: int):
        super().__init__(cfg, index)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def heads(self, x):
        qk, v = super().heads(x)                                       # (B, S, Hq + Hkv, D), (B, S, Hkv, D)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=2)
        return torch.cat((self.q_norm(q), self.k_norm(k)), dim=2), v


class Qwen3Layer(LlamaLayer):
    attention_class = Qwen3Attention


class Qwen3(Llama):
    family = "qwen3"
    layer_class = Qwen3Layer
