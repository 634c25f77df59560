"""Attention backends: one signature, picked by name from a small registry.

    attend(q, k, v, *, mask, scale) -> out

Shape legend used in every file of minibt:
    B  batch            S  sequence (Sq queries, Skv keys)     T  real tokens of a packed batch
    H  hidden size      Hq query heads   Hkv key/value heads   D  head dim       V  vocabulary

q: (B, Hq, Sq, D)   k, v: (B, Hkv, Skv, D) with Hq % Hkv == 0 (GQA)   out: (B, Hq, Sq, D)
mask: an `AttnMask` (attention/mask.py). A packed batch (varlen) is B = 1, S = T with the
sequence bounds in mask.cu_seqlens, so every backend can run it; `packed` backends want it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import BackendError
from .mask import AttnMask


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    packed: bool = False   # wants the padding removed at the model's entry (see kernels/padding.py)
    probs: bool = False    # fn(..., return_probs=True) -> (out, probs)


_REGISTRY: dict[str, Backend] = {}


def register(name: str, fn: Callable, *, packed: bool = False, probs: bool = False) -> None:
    """Add a backend; `fn(q, k, v, *, mask, scale)` as above."""
    _REGISTRY[name] = Backend(name, fn, packed, probs)


def backends() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise BackendError(f"unknown attention backend {name!r}; registered: {', '.join(backends())}")
    return _REGISTRY[name]


from .naive import naive  # noqa: E402
from .sdpa import sdpa  # noqa: E402
from .flash import flash  # noqa: E402
from .varlen import varlen  # noqa: E402
from .tiled import tiled  # noqa: E402

register("naive", naive, probs=True)
register("sdpa", sdpa)
register("flash", flash)
register("varlen", varlen, packed=True)
register("tiled", tiled)

__all__ = ["AttnMask", "Backend", "backends", "get", "register", "naive", "sdpa", "flash", "varlen", "tiled"]
