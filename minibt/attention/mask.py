"""The one mask object every backend reads. Convention: True = attend / real token, converted here and nowhere else.

Besides padding, causality, the query offset and packing, it carries the attention variants of 2026's open models
as data (never as a dense (B, H, S, S) tensor built by the model): a window, an additive score bias (ALiBi slopes,
or a relative-position bucket table with its bucket function), a logit softcap and per-head sinks. naive.py is their
definition; every backend computes each one exactly or is refused it by name (the registry's `variants`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

VARIANTS = ("window", "alibi", "relative", "softcap", "sinks")
CAPABILITIES = VARIANTS + ("vdim",)      # and values whose head dim differs from the queries' (MLA)


@dataclass(frozen=True, eq=False)
class RelativeBias:
    """score[i, j] += table[bucket(j - i), h] (T5, MPNet): a learned table of (buckets, Hq) and the function that
    maps a signed distance key - query (a LongTensor) to its bucket."""
    table: torch.Tensor
    bucket: Callable


class AttnMask:
    """What a query may attend to, and how its scores are shaped, for one attention call.

    key_padding: (B, Skv) bool, True = real token; None when no row has padding.
    causal:      a query may only see keys at or before its own position.
    q_offset:    query i sits at key position q_offset + i (decode steps with a KV cache).
    cu_seqlens:  packed batch: the token axis holds sequences back to back, sequence b at
                 [cu_seqlens[b], cu_seqlens[b+1]); tensors then have B = 1 and S = T real tokens.
    window:      (left, right): key j visible from query i iff i - left <= j <= i + right; either side None for
                 no limit. Mistral's sliding window W is (W - 1, 0) with causal; ModernBERT's local ±64 is (64, 64).
    alibi:       (Hq,) slopes: score[h, i, j] -= slope[h] * |i - j|   (Press et al., 2022; BLOOM, JinaBERT).
    relative:    a RelativeBias: score[h, i, j] += table[bucket(j - i), h]   (T5, MPNet).
    softcap:     c: score = c * tanh(score / c), after the bias and before the mask   (Gemma 2: 50).
    sinks:       (Hq,) logits in the softmax's denominator only: p[i, j] = exp(s[i, j]) / (exp(sink[h]) +
                 sum_j exp(s[i, j]))   (gpt-oss; a learned "attend to nothing").
    Positions are indices on the key axis: with left padding or packing the real tokens of a row are contiguous, so
    index distance is token distance. Everything a backend needs (bool mask, rows with no key, sequence bounds,
    the score bias) is derived lazily, once per forward (variants of one batch share the cache).
    """

    def __init__(self, key_padding=None, *, causal=False, q_offset=0, cu_seqlens=None, window=None, alibi=None,
                 relative=None, softcap=None, sinks=None):
        self.key_padding = key_padding
        self.causal = causal
        self.q_offset = q_offset
        self.cu_seqlens = cu_seqlens
        self.window = None if window is None or window == (None, None) else tuple(window)
        self.alibi, self.relative, self.softcap, self.sinks = alibi, relative, softcap, sinks
        self._cache = {}

    def variants(self) -> set[str]:
        """The variants this mask asks of a backend, by name."""
        return {name for name in VARIANTS if getattr(self, name) is not None}

    def with_variants(self, **variants) -> "AttnMask":
        """This batch's mask with a layer's variants (window, alibi, relative, softcap, sinks); shares the cache."""
        out = copy.copy(self)
        out.window = None
        out.alibi = out.relative = out.softcap = out.sinks = None
        for name, value in variants.items():
            setattr(out, name, value)
        if out.window == (None, None):
            out.window = None
        return out

    def last_keys(self, skv: int, sq: int) -> "AttnMask":
        """The same mask over only the last `skv` keys (a rolling KV cache of a windowed layer keeps no more)."""
        out = copy.copy(self)
        out.key_padding = None if self.key_padding is None else self.key_padding[:, -skv:]
        out.q_offset = skv - sq
        out._cache = {}
        return out

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) of each packed sequence, as Python ints (one device sync, cached)."""
        if "bounds" not in self._cache:
            cu = self.cu_seqlens.tolist()
            self._cache["bounds"] = [(s, e) for s, e in zip(cu[:-1], cu[1:]) if e > s]
        return self._cache["bounds"]

    def runs(self) -> list[tuple[int, int, int]]:
        """(start, count, length): consecutive packed sequences of equal length, which can share one batched call."""
        if "runs" not in self._cache:
            runs = []
            for s, e in self.bounds():
                if runs and runs[-1][2] == e - s and runs[-1][0] + runs[-1][1] * runs[-1][2] == s:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1, e - s)
                else:
                    runs.append((s, 1, e - s))
            self._cache["runs"] = runs
        return self._cache["runs"]

    def plain_causal(self, sq: int, skv: int) -> bool:
        """True when `is_causal=True` of SDPA (top-left aligned) is exactly this mask."""
        return (self.causal and self.key_padding is None and not self.packed and self.q_offset == 0 and sq == skv
                and self.window is None)

    def positions(self, sq: int, skv: int, device=None):
        """(query positions (Sq, 1), key positions (1, Skv)) on the key axis, as int64."""
        device = device or self._device()
        return (torch.arange(sq, device=device)[:, None] + self.q_offset,
                torch.arange(skv, device=device)[None, :])

    def allowed(self, sq: int, skv: int) -> torch.Tensor | None:
        """(B or 1, 1, Sq, Skv) bool, True = attend; None when every query sees every key."""
        key = ("allowed", sq, skv, self.window)
        if key not in self._cache:
            self._cache[key] = self._build(sq, skv)
        return self._cache[key]

    def empty_rows(self, sq: int, skv: int) -> torch.Tensor | None:
        """(B or 1, 1, Sq, 1) bool of query rows that have no key at all; None when there are none."""
        key = ("empty", sq, skv, self.window)
        if key not in self._cache:
            allowed = self.allowed(sq, skv)
            empty = None if allowed is None else ~allowed.any(-1, keepdim=True)
            self._cache[key] = empty if empty is not None and bool(empty.any()) else None
        return self._cache[key]

    def score_bias(self, sq: int, skv: int, dtype=torch.float32) -> torch.Tensor | None:
        """(1, Hq, Sq, Skv) additive score bias of ALiBi and relative positions, or None; built from the slopes and
        the table each call (they are the layer's data), the distances once per batch."""
        if self.alibi is None and self.relative is None:
            return None
        key = ("distance", sq, skv)
        if key not in self._cache:
            q_pos, k_pos = self.positions(sq, skv, self._bias_device())
            self._cache[key] = k_pos - q_pos                                                   # (Sq, Skv): j - i
        distance = self._cache[key]
        bias = 0
        if self.alibi is not None:
            bias = -self.alibi.to(dtype)[:, None, None] * distance.abs().to(dtype)           # (Hq, Sq, Skv)
        if self.relative is not None:
            table = self.relative.table
            bias = bias + table[self.relative.bucket(distance)].to(dtype).permute(2, 0, 1)   # (Hq, Sq, Skv)
        return bias.unsqueeze(0)

    def _build(self, sq, skv):
        allowed = None
        device = self._device()
        if self.window is not None or (self.causal and not (sq == 1 and self.q_offset >= skv - 1)):
            q_pos, k_pos = self.positions(sq, skv, device)
            left, right = self.window or (None, None)
            if self.causal:
                right = 0 if right is None else min(right, 0)
            ok = torch.ones(sq, skv, dtype=torch.bool, device=device)
            if left is not None:
                ok &= k_pos >= q_pos - left
            if right is not None:
                ok &= k_pos <= q_pos + right
            allowed = ok[None, None]                                                        # (1, 1, Sq, Skv)
        if self.key_padding is not None:
            pad = self.key_padding[:, None, None, :]                                        # (B, 1, 1, Skv)
            allowed = pad if allowed is None else allowed & pad
        if self.packed:
            seq_id = torch.repeat_interleave(torch.arange(len(self.cu_seqlens) - 1, device=device),
                                             self.cu_seqlens.diff(), output_size=skv)
            same = (seq_id[-sq:, None] == seq_id[None, :])[None, None]                      # (1, 1, Sq, Skv)
            allowed = same if allowed is None else allowed & same
        if allowed is not None and allowed.shape[-2] != sq:
            allowed = allowed.expand(-1, -1, sq, -1)
        return allowed

    def _device(self):
        for t in (self.key_padding, self.cu_seqlens):
            if t is not None:
                return t.device
        return None

    def _bias_device(self):
        for t in (self.alibi, None if self.relative is None else self.relative.table, self.key_padding,
                  self.cu_seqlens):
            if t is not None:
                return t.device
        return None
