"""The one mask object every backend reads. Convention: True = attend / real token, converted here and nowhere else."""
from __future__ import annotations

import torch


class AttnMask:
    """What a query may attend to, for one forward pass.

    key_padding: (B, Skv) bool, True = real token; None when no row has padding.
    causal:      a query may only see keys at or before its own position.
    q_offset:    query i sits at key position q_offset + i (decode steps with a KV cache).
    cu_seqlens:  packed batch: the token axis holds sequences back to back, sequence b at
                 [cu_seqlens[b], cu_seqlens[b+1]); tensors then have B = 1 and S = T real tokens.
    Everything a backend needs (bool mask, rows with no key, sequence bounds) is derived lazily, once.
    """

    def __init__(self, key_padding=None, *, causal=False, q_offset=0, cu_seqlens=None):
        self.key_padding = key_padding
        self.causal = causal
        self.q_offset = q_offset
        self.cu_seqlens = cu_seqlens
        self._cache = {}

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
        return self.causal and self.key_padding is None and not self.packed and self.q_offset == 0 and sq == skv

    def allowed(self, sq: int, skv: int) -> torch.Tensor | None:
        """(B or 1, 1, Sq, Skv) bool, True = attend; None when every query sees every key."""
        key = ("allowed", sq, skv)
        if key not in self._cache:
            self._cache[key] = self._build(sq, skv)
        return self._cache[key]

    def empty_rows(self, sq: int, skv: int) -> torch.Tensor | None:
        """(B or 1, 1, Sq, 1) bool of query rows that have no key at all; None when there are none."""
        key = ("empty", sq, skv)
        if key not in self._cache:
            allowed = self.allowed(sq, skv)
            empty = None if allowed is None else ~allowed.any(-1, keepdim=True)
            self._cache[key] = empty if empty is not None and bool(empty.any()) else None
        return self._cache[key]

    def _build(self, sq, skv):
        allowed = None
        device = self._device()
        if self.causal and not (sq == 1 and self.q_offset >= skv - 1):    # one query after every key: no constraint
            q_pos = torch.arange(sq, device=device)[:, None] + self.q_offset
            allowed = (torch.arange(skv, device=device)[None, :] <= q_pos)[None, None]      # (1, 1, Sq, Skv)
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
