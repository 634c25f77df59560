"""Remove padding once at a model's entry and put it back once at its exit."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Packing:
    """Gathers the real tokens of a (B, S) batch into one (1, T) sequence, in order.

    Works for right, left or holey padding: tokens are picked by index, so each row's real tokens
    end up contiguous and cu_seqlens marks where each row starts.
    """

    def __init__(self, attention_mask: torch.Tensor):
        self.batch, self.seq = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)                # (T,)
        self.cu_seqlens = F.pad(attention_mask.sum(1).cumsum(0), (1, 0)).to(torch.int64)   # (B + 1,)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (1, T, ...)"""
        return t.reshape(self.batch * self.seq, *t.shape[2:])[self.index].unsqueeze(0)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """(1, T, ...) -> (B, S, ...), zeros where the batch had padding."""
        out = t.new_zeros(self.batch * self.seq, *t.shape[2:])
        out[self.index] = t[0]
        return out.view(self.batch, self.seq, *t.shape[2:])
