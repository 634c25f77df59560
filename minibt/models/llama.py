"""Llama: RMSNorm, rotate-half RoPE (with the scaling kinds real checkpoints use), GQA, SwiGLU, tied or untied head."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .common import activation
from .decoder import Decoder, DecodeLinear


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope: dict = field(default_factory=dict)        # rope_type and its parameters ("default" = unscaled)
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, c: dict) -> "LlamaConfig":
        # Two hub layouts: classic `rope_theta` + `rope_scaling` at top level, newer `rope_parameters`.
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_KINDS:
            raise ConfigError(f"config.json rope type {kind!r} is not implemented; minibt has {', '.join(ROPE_KINDS)}")
        rope["rope_type"] = kind
        heads = c["num_attention_heads"]
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], heads,
                   c.get("num_key_value_heads") or heads, c.get("head_dim") or c["hidden_size"] // heads,
                   c["intermediate_size"], c.get("max_position_embeddings", 2048), c.get("rms_norm_eps", 1e-6),
                   c.get("hidden_act", "silu"), c.get("attention_bias", False), c.get("mlp_bias", False), theta, rope,
                   c.get("pad_token_id"), c.get("tie_word_embeddings", False))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x):
        """x / sqrt(mean(x^2) + eps) with fp32 statistics, rounded to x's dtype, then times the weight (HF's order).

        Written as one LayerNorm over [x, -x]: that vector has mean 0 and variance mean(x^2), so LayerNorm divides
        by the RMS (exactly, in exact arithmetic) in one fused kernel that keeps its statistics in fp32 and returns
        x's dtype. The plain form, `w * F.rms_norm(x.float(), ...).to(x.dtype)`, is about eight kernels on CPU; a
        decode step pays per kernel, and this saved 1.4-1.6 ms of a 25-46 ms SmolLM2-135M step (fp32 and bf16,
        batch 1 and 4). bf16 output is bit-identical to the plain form; fp32 differs by under 1e-6
        (tests/test_decoders.py)."""
        d = x.shape[-1]
        return self.weight * F.layer_norm(torch.cat((x, -x), dim=-1), (2 * d,), eps=self.eps)[..., :d]


# ------------------------------------------------------------------------------------------------------ RoPE

def _linear(inv_freq, rope, seq_len, cfg):
    return inv_freq / rope["factor"]


def _dynamic(inv_freq, rope, seq_len, cfg):
    """NTK-aware: once a sequence outgrows the trained length, raise the base (recomputed per call, as HF does)."""
    if seq_len <= cfg.max_positions:
        return inv_freq
    d = cfg.head_dim
    base = cfg.rope_theta * ((rope["factor"] * seq_len / cfg.max_positions) - (rope["factor"] - 1)) ** (d / (d - 2))
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=inv_freq.device) / d)


def _llama3(inv_freq, rope, seq_len, cfg):
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


ROPE_KINDS = {"default": lambda inv_freq, *_: inv_freq, "linear": _linear, "dynamic": _dynamic, "llama3": _llama3}


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x, cos, sin):
    """x (B, S, H, D); cos, sin (B, S, D). The checkpoint's own (rotate-half) layout: weights are never permuted."""
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)


# ------------------------------------------------------------------------------------------------------ model

class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = DecodeLinear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)      # q, k, v in one matmul
        self.out = DecodeLinear(q, cfg.hidden_size, bias=cfg.attention_bias)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up = DecodeLinear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act, "hidden_act")
        self.down = DecodeLinear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.split = (q, kv, kv)

    def forward(self, x, mask, attend, kv, cos, sin):
        b, s, _ = x.shape
        qk, v = self.qkv(self.norm1(x)).split((self.split[0] + self.split[1], self.split[2]), dim=-1)
        qk = apply_rope(qk.view(b, s, self.heads + self.kv_heads, self.head_dim), cos, sin)  # q and k in one go
        q, k = qk.transpose(1, 2).split((self.heads, self.kv_heads), dim=1)       # (B, Hq, S, D), (B, Hkv, S, D)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if kv is not None:
            k, v = kv(k, v)                                                                     # (B, Hkv, past + S, D)
        a = attend(q, k, v, mask=mask, scale=self.head_dim ** -0.5)
        x = x + self.out(a.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(self.act(gate) * up)                                                # SwiGLU


class Llama(Decoder):
    family = "llama"

    def __init__(self, cfg: LlamaConfig, head: str = "causal-lm"):
        super().__init__()
        self.config, self.head = cfg, head
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = DecodeLinear(cfg.hidden_size, cfg.vocab_size, bias=False) if head == "causal-lm" else None
        self.set_attention("auto")

    @classmethod
    def from_hf(cls, config: dict, head: str, keys: set):
        cfg = LlamaConfig.from_hf(config)
        if head == "causal-lm" and "lm_head.weight" not in keys:
            cfg.tie_word_embeddings = True          # checkpoints without lm_head.weight load tied
        return cls(cfg, head)

    def max_length(self) -> int:
        # linear / dynamic scaling stretch the trained positions by `factor`; llama3 configs already state the
        # extended length in max_position_embeddings.
        kind = self.config.rope["rope_type"]
        return int(self.config.max_positions * (self.config.rope["factor"] if kind in ("linear", "dynamic") else 1))

    def inputs(self, ids, positions):
        return self.embed(ids)

    def rope(self, positions):
        """positions (B, S) -> cos, sin (B, S, D) in the model's dtype, computed in fp32 once per forward."""
        cfg = self.config
        d = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d)
        seq_len = int(positions.max()) + 1 if positions.numel() else 0
        inv_freq = ROPE_KINDS[cfg.rope["rope_type"]](inv_freq, cfg.rope, seq_len, cfg)
        freqs = positions.float()[..., None] * inv_freq                                     # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def final(self, x):
        return self.norm(x)
