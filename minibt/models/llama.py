"""Llama (Touvron et al., 2023): RMSNorm, rotary position embeddings (RoPE, with the scaling kinds real checkpoints
use), grouped-query attention (GQA), a SwiGLU MLP, and a tied or untied LM head.

Textbook maths only (speed is applied from outside, after loading: minibt/kernels/). Shape legend in
minibt/attention/__init__.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention import Batch, cache_length, check_ids, check_mask, check_positions
from ..config import Fields
from ..errors import ConfigError
from .common import ACTIVATIONS, CausalLM, Output, activation


# ------------------------------------------------------------------------------------------------------ config

@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    qkv_bias: bool = False                  # attention_bias: q, k, v and out; Qwen2: q, k, v only
    out_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope: dict = field(default_factory=lambda: {"rope_type": "default"})   # rope_type and its parameters
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    layer_windows: list | None = None       # per layer: None (full attention) or (left, 0), a causal window

    def windows(self) -> list:
        """Each layer's attention window: None, or (W - 1, 0) for a sliding window of W keys."""
        return self.layer_windows or [None] * self.num_layers

    @classmethod
    def from_hf(cls, c: dict, where: str = "config.json") -> "LlamaConfig":
        f = Fields(c, where)
        heads = f.int("num_attention_heads")
        hidden = f.int("hidden_size")
        cfg = cls(vocab_size=f.int("vocab_size"), hidden_size=hidden, num_layers=f.int("num_hidden_layers", min=0),
                  num_heads=heads, num_kv_heads=f.int("num_key_value_heads", None, none_ok=True) or heads,
                  head_dim=f.int("head_dim", None, none_ok=True) or hidden // heads,
                  intermediate_size=f.int("intermediate_size"), max_positions=f.int("max_position_embeddings", 2048),
                  rms_norm_eps=f.float("rms_norm_eps", 1e-6, positive=True),
                  hidden_act=f.str("hidden_act", "silu", choices=tuple(ACTIVATIONS)),
                  qkv_bias=f.bool("attention_bias", False), out_bias=f.bool("attention_bias", False),
                  mlp_bias=f.bool("mlp_bias", False),
                  pad_token_id=f.int("pad_token_id", None, min=0, none_ok=True),
                  tie_word_embeddings=f.bool("tie_word_embeddings", False))
        if "head_dim" not in c or c["head_dim"] is None:
            f.divides("hidden_size", "num_attention_heads", hidden, heads)
        f.divides("num_attention_heads", "num_key_value_heads", heads, cfg.num_kv_heads)
        if cfg.head_dim % 2:
            raise ConfigError(f"{where}: head_dim = {cfg.head_dim} must be even for rotary embeddings")
        cfg.rope_theta, cfg.rope = rope_config(f)
        cfg.layer_windows = sliding_windows(f, cfg.num_layers)
        return cfg


def sliding_windows(f: Fields, layers: int) -> list | None:
    """`sliding_window` (W keys, the query's own included: key j visible iff i - W < j <= i) on the layers that
    `layer_types` marks "sliding_attention" (transformers 5), or on every layer when there is no `layer_types`
    (Mistral); None: no layer has one."""
    width = f.int("sliding_window", None, none_ok=True)
    types = f.c.get("layer_types")
    if types is None:
        return None if width is None else [(width - 1, 0)] * layers
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
        f.fail("layer_types", types, f"must list {layers} of 'full_attention' / 'sliding_attention'")
    if "sliding_attention" in types and width is None:
        f.fail("sliding_window", None, "is needed by the 'sliding_attention' layers of layer_types")
    return [(width - 1, 0) if t == "sliding_attention" else None for t in types]


def rope_config(f: Fields) -> tuple[float, dict]:
    """Two hub layouts: classic `rope_theta` + `rope_scaling` at top level, newer `rope_parameters`."""
    rope = dict(f.dict("rope_parameters") or f.dict("rope_scaling"))
    where = f"{f.where} rope_parameters" if f.c.get("rope_parameters") else f"{f.where} rope_scaling"
    r = Fields(rope, where)
    theta = r.float("rope_theta", f.float("rope_theta", 10000.0, positive=True), positive=True)
    kind = r.str("rope_type", r.str("type", "default"), choices=tuple(ROPE_KINDS))
    out = {"rope_type": kind}
    if kind != "default":
        out["factor"] = r.float("factor", positive=True)
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            out[key] = r.float(key, positive=True)
        out["original_max_position_embeddings"] = r.int("original_max_position_embeddings")
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            r.fail("high_freq_factor", out["high_freq_factor"], "must be > low_freq_factor")
    if kind == "yarn":
        out["original_max_position_embeddings"] = r.int("original_max_position_embeddings")
        out["beta_fast"] = r.float("beta_fast", 32.0, positive=True) if rope.get("beta_fast") is not None else 32.0
        out["beta_slow"] = r.float("beta_slow", 1.0, positive=True) if rope.get("beta_slow") is not None else 1.0
        out["truncate"] = r.bool("truncate", True)
        out["attention_factor"] = yarn_attention_factor(r, out["factor"])
    return theta, out


def yarn_attention_factor(r: Fields, factor: float) -> float:
    """YaRN's scale of cos and sin: `attention_factor` if given, else 0.1 ln(factor) + 1 (with mscale and
    mscale_all_dim, the ratio of two such terms)."""
    if r.c.get("attention_factor") is not None:
        return r.float("attention_factor", positive=True)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if r.c.get("mscale") and r.c.get("mscale_all_dim"):
        return mscale(factor, r.float("mscale")) / mscale(factor, r.float("mscale_all_dim"))
    return mscale(factor)


# ------------------------------------------------------------------------------------------------------ norm

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019), statistics in fp32 and the normalised value
    rounded to x's dtype before the weight (transformers' order, so bf16 results match bit for bit)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


# ------------------------------------------------------------------------------------------------------ RoPE

def _linear_scaling(inv_freq, rope, seq_len, cfg):
    return inv_freq / rope["factor"]


def _dynamic_scaling(inv_freq, rope, seq_len, cfg):
    """NTK-aware: once a sequence outgrows the trained length, raise the base (recomputed per call, as HF does)."""
    if seq_len <= cfg.max_positions:
        return inv_freq
    d = cfg.head_dim
    base = cfg.rope_theta * ((rope["factor"] * seq_len / cfg.max_positions) - (rope["factor"] - 1)) ** (d / (d - 2))
    return 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=inv_freq.device) / d)


def _llama3_scaling(inv_freq, rope, seq_len, cfg):
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def _yarn_scaling(inv_freq, rope, seq_len, cfg):
    """YaRN (Peng et al., 2023): frequencies that turn fewer than beta_slow times over the original context are
    interpolated (divided by `factor`), those that turn more than beta_fast times are kept, a linear ramp between;
    cos and sin are then scaled by `attention_factor` (RotaryEmbedding)."""
    d, base = cfg.head_dim, cfg.rope_theta

    def dim_of(turns):               # the pair index whose wavelength fits `turns` times in the original context
        return d * math.log(rope["original_max_position_embeddings"] / (turns * 2 * math.pi)) / (2 * math.log(base))
    low, high = dim_of(rope["beta_fast"]), dim_of(rope["beta_slow"])
    if rope["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=inv_freq.device) - low)
            / (high - low if high != low else 0.001)).clamp(0, 1)
    return inv_freq / rope["factor"] * ramp + inv_freq * (1 - ramp)


ROPE_KINDS = {"default": lambda inv_freq, *_: inv_freq, "linear": _linear_scaling, "dynamic": _dynamic_scaling,
              "llama3": _llama3_scaling, "yarn": _yarn_scaling}


class RotaryEmbedding(nn.Module):
    """positions (B, S) -> cos, sin (B, S, D): angle position / theta^(2i/D) for each pair i, computed in fp32."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, positions, dtype):
        cfg, d = self.cfg, self.cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d)
        seq_len = int(positions.max()) + 1 if positions.numel() else 0
        inv_freq = ROPE_KINDS[cfg.rope["rope_type"]](inv_freq, cfg.rope, seq_len, cfg)
        angles = positions.float()[..., None] * inv_freq                                    # (B, S, D/2)
        emb = torch.cat((angles, angles), dim=-1)                                           # (B, S, D)
        cos, sin = emb.cos(), emb.sin()
        if "attention_factor" in cfg.rope:                                                  # YaRN scales both
            cos, sin = cos * cfg.rope["attention_factor"], sin * cfg.rope["attention_factor"]
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x, cos, sin):
    """x (B, S, heads, D); cos, sin (B, S, D). The checkpoint's own (rotate-half) layout: weights are never permuted."""
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)


# ------------------------------------------------------------------------------------------------------ blocks

class Attention(nn.Module):
    """Causal self-attention with RoPE on q and k, and Hkv <= Hq key/value heads (GQA: each shared by a group);
    a causal sliding window on the layers config.json gives one (`windows()`)."""

    def __init__(self, cfg: LlamaConfig, index: int):
        super().__init__()
        self.index, self.num_heads, self.num_kv_heads, self.head_dim = index, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.window = cfg.windows()[index]                            # None, or a causal sliding window
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.qkv_bias)            # q, k, v in one matmul
        self.out = nn.Linear(q, cfg.hidden_size, bias=cfg.out_bias)

    def heads(self, x):
        """x (B, S, H) -> q and k (B, S, Hq + Hkv, D), v (B, S, Hkv, D): the projection, split into heads."""
        b, s, _ = x.shape
        return self.qkv(x).view(b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim).split(
            (self.num_heads + self.num_kv_heads, self.num_kv_heads), dim=2)

    def variants(self) -> dict:
        """The attention variants this layer uses (attention/mask.py): a window on the layers that have one."""
        return {"window": self.window}

    def forward(self, x, batch: Batch):
        b, s, _ = x.shape
        qk, v = self.heads(x)                                  # (B, S, Hq + Hkv, D), (B, S, Hkv, D)
        qk = apply_rope(qk, *batch.rope).transpose(1, 2)                               # q and k rotated in one call
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)                    # (B, Hq, S, D), (B, Hkv, S, D)
        v = v.transpose(1, 2)                                                          # (B, Hkv, S, D)
        if batch.cache is not None:                    # written at positions past.., read back from 0
            k, v = batch.cache.write(self.index, k, v, batch.past, batch.packing)     # (B, Hkv, past + S, D)
        a, probs = batch.attend(q, k, v, scale=self.scale, **self.variants())           # (B, Hq, S, D)
        return self.out(a.transpose(1, 2).reshape(b, s, -1)), probs                    # (B, S, H)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act, "hidden_act")
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class LlamaLayer(nn.Module):
    """Pre-norm: x = x + attention(norm1(x)); x = x + mlp(norm2(x))."""

    attention_class = Attention                     # a relative's own attention (qwen.py: Qwen3)

    def __init__(self, cfg: LlamaConfig, index: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = self.attention_class(cfg, index)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, batch: Batch):
        a, probs = self.attention(self.norm1(x), batch)
        x = x + a
        return x + self.mlp(self.norm2(x)), probs


# ------------------------------------------------------------------------------------------------------ model

class Llama(CausalLM):
    family = "llama"
    config_from_hf = staticmethod(LlamaConfig.from_hf)
    layer_class = LlamaLayer                        # a relative's own layer (qwen.py: Qwen3)

    def __init__(self, cfg: LlamaConfig, head: str = "causal-lm"):
        super().__init__()
        self.config, self.head = cfg, head
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(self.layer_class(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if head == "causal-lm" else None
        self.variants = frozenset(name for layer in self.layers for name, value in layer.attention.variants().items()
                                  if value is not None)

    def max_length(self) -> int:
        # linear / dynamic scaling stretch the trained positions by `factor`; llama3 configs already state the
        # extended length in max_position_embeddings.
        rope = self.config.rope
        return int(self.config.max_positions * (rope["factor"] if rope["rope_type"] in ("linear", "dynamic") else 1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                output_attentions=False, last_only=False):
        """input_ids (B, S); attention_mask (B, past + S) over cached and new tokens (left padding: 1 = real);
        past_key_values: a KVCache (attention/cache.py) that this call reads and extends; last_only: the hidden
        state and logits of the last position only (generation's next token)."""
        cache = past_key_values
        past = cache_length(cache)
        check_ids(input_ids, vocab_size=self.config.vocab_size, max_length=self.max_length() - past)
        b, s = input_ids.shape
        mask = check_mask(attention_mask, (b, past + s), "(batch, cached + new tokens)", input_ids.device)
        if position_ids is None:        # a row's first real token is position 0, whatever its left padding
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]
        else:
            check_positions(position_ids, (b, s), self.max_length())
        batch = Batch(mask, (b, s), self.backend, causal=True, cache=cache, probs=output_attentions,
                      variants=self.variants)

        x = self.embeddings(batch.pack(input_ids))                               # (B, S, H), or (1, T, H) packed
        batch.rope = self.rope(batch.pack(position_ids), x.dtype)                # cos, sin (B, S, D) for every layer
        attentions = []
        for layer in self.layers:
            x, probs = layer(x, batch)
            attentions.append(probs)
        x = self.norm(x)

        if last_only:
            x = batch.unpack(x)[:, -1:]                                          # left padding: the last column is real
            logits = self.logits(x) if self.lm_head is not None else None
        else:
            logits = batch.unpack(self.logits(x)) if self.lm_head is not None else None
            x = batch.unpack(x)
        return Output(x, logits, attentions=tuple(attentions) if output_attentions else None, past_key_values=cache)

    def embeddings(self, ids):
        """(B, S) token ids -> (B, S, H) (Gemma 2 scales them)."""
        return self.embed(ids)

    def logits(self, x):
        """(..., H) -> (..., V) (Gemma 2 softcaps them)."""
        return self.lm_head(x)
