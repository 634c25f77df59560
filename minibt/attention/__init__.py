"""Attention backends: one signature, picked by name from one registry.

    attend(q, k, v, *, mask, scale) -> out

Shape legend used in every file of minibt:
    B  batch            S  sequence (Sq queries, Skv keys)     T  real tokens of a packed batch
    H  hidden size      Hq query heads   Hkv key/value heads   D  head dim       V  vocabulary

q: (B, Hq, Sq, D)   k, v: (B, Hkv, Skv, D) with Hq % Hkv == 0 (GQA)   out: (B, Hq, Sq, D)
mask: an `AttnMask` (attention/mask.py). A packed batch (varlen) is B = 1, S = T with the
sequence bounds in mask.cu_seqlens, so every backend can run it; `packed` backends want it.

This package is also how a model's forward sees its batch (batch.py: the checked ids and mask, the packing of
real tokens, the attention call of every layer) and where decoders keep keys and values (cache.py).

The registry holds three kinds of entry, and `backends()` lists them all (what `set_attention` accepts):
    attention functions  naive, sdpa, flash, varlen, tiled, flex, and user backends (`register`)
    the route `auto`     picks one of the functions per call (attention/auto.py)
    model-level `fused`  a transform that swaps an encoder's layer stack for torch's fused op; minibt/kernels
                         registers it (`register_transform`), since kernels sit above attention
Model code makes a `Batch` and calls `batch.attend(...)`; it never branches on which backend runs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BackendError
from .mask import CAPABILITIES, VARIANTS, AttnMask, RelativeBias


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable | None                 # attend(q, k, v, *, mask, scale); None for the auto route
    packed: bool = False                # wants the padding removed at the model's entry (kernels/padding.py)
    probs: bool = False                 # fn(..., return_probs=True) -> (out, probs)
    route: Callable | None = None       # auto: (attention_mask, output_attentions, variants) -> the backend's name
    transform: object | None = None     # model-level: an object with apply(model) / remove(model), run by `use`
    variants: frozenset = frozenset()   # attention variants it computes exactly (mask.VARIANTS); others refused

    def __deepcopy__(self, memo):
        return self                     # a registry entry: copies of a model share it


_REGISTRY: dict[str, Backend] = {}
BUILTIN = ("naive", "sdpa", "flash", "varlen", "tiled", "flex", "fused", "auto")   # "fused": kernels/fused_encoder.py


def register(name: str, fn: Callable, *, packed: bool = False, probs: bool = False, check: bool = True,
             variants=()) -> None:
    """Add a user backend `fn(q, k, v, *, mask, scale)`. At its first call its output is checked against the
    spec: q's shape and dtype, and the numbers of `naive` on the same inputs (this catches a transposed layout of
    the same size); check=False skips the numbers for a deliberately approximate backend. variants: the attention
    variants it computes (names in minibt.attention.CAPABILITIES: window, alibi, relative, softcap, sinks, and vdim
    for values of another head dim); a model layer that needs another one is refused with a BackendError naming it. The built-in names cannot be
    replaced: `naive` is the spec every backend is tested against."""
    if not isinstance(name, str) or not name:
        raise BackendError(f"a backend name must be a non-empty string, got {name!r}")
    if name in BUILTIN:
        raise BackendError(f"{name!r} is a built-in backend and cannot be replaced; register yours under another name")
    if not callable(fn):
        raise BackendError(f"register({name!r}, fn): fn must be callable, got {type(fn).__name__}")
    unknown = set(variants) - set(CAPABILITIES)
    if unknown:
        raise BackendError(f"register({name!r}): unknown variants {sorted(unknown)}; minibt has "
                           f"{', '.join(CAPABILITIES)}")
    _REGISTRY[name] = Backend(name, _checked(name, fn, check), packed, probs, variants=frozenset(variants))


def _checked(name: str, fn: Callable, numbers: bool) -> Callable:
    """Wrap a user backend so that its first call is compared with the spec. When that call has no padding, the
    backend is also run once on the same q, k, v with padding (row 0's first half of keys masked), so that one
    which ignores the mask is caught even when the first batch a model sees is unpadded."""
    state = {"checked": False}

    def call(q, k, v, mask, scale, kwargs):
        out = fn(q, k, v, mask=mask, scale=scale, **kwargs)
        return out, (out[0] if kwargs.get("return_probs") and isinstance(out, tuple) else out)

    def compare(got, q, k, v, mask, scale, rows, where):
        from .testing import TOLERANCE
        with torch.no_grad():
            want = naive(q, k, v, mask=mask, scale=scale)
            diff = (got.float() - want.float()).abs()
            if rows is not None:                        # a padded probe: only the real queries' outputs count
                diff = diff[rows]
            err = float(diff.max()) if diff.numel() else 0.0
            scale_ = float(want.abs().max()) if want.numel() else 1.0
        limit = TOLERANCE.get(q.dtype, 3e-2) * max(1.0, scale_)
        if not err <= limit:
            raise BackendError(f"attention backend {name!r} differs from the naive spec by {err:.2e} "
                               f"(limit {limit:.0e}) at its first call{where}, q {tuple(q.shape)} {q.dtype}: check "
                               "its output layout (B, Hq, Sq, D) and mask handling (mask.key_padding: False = "
                               "padding), or register(..., check=False) for a deliberately approximate backend")

    def attend(q, k, v, *, mask, scale, **kwargs):
        out, got = call(q, k, v, mask, scale, kwargs)
        if not state["checked"]:
            want_shape = (*q.shape[:3], v.shape[3])
            if not hasattr(got, "shape") or tuple(got.shape) != want_shape or got.dtype != q.dtype:
                shape = tuple(got.shape) if hasattr(got, "shape") else type(got).__name__
                raise BackendError(f"attention backend {name!r} returned {shape} {getattr(got, 'dtype', '')}; "
                                   f"it must return q's shape with v's head dim, (B, Hq, Sq, Dv) = {want_shape}, "
                                   f"and dtype {q.dtype}")
            if numbers:
                compare(got, q, k, v, mask, scale, None, "")
                skv = k.shape[2]
                if mask.key_padding is None and mask.cu_seqlens is None and skv >= 2:
                    probe = copy.copy(mask)
                    probe._cache = {}
                    probe.key_padding = torch.ones(k.shape[0], skv, dtype=torch.bool, device=k.device)
                    probe.key_padding[0, : skv // 2] = False
                    real = probe.key_padding[:, mask.q_offset: mask.q_offset + q.shape[2]]     # (B, Sq)
                    with torch.no_grad():
                        _, padded = call(q, k, v, probe, scale, kwargs)
                    rows = real[:, None, :].expand(q.shape[0], q.shape[1], q.shape[2])
                    compare(padded, q, k, v, probe, scale, rows, f" on a padded input (row 0's first {skv // 2} "
                                                                 "keys masked)")
            state["checked"] = True
        return out
    attend.__name__ = getattr(fn, "__name__", name)
    return attend


def register_transform(name: str, transform, *, packed: bool) -> None:
    """A model-level backend: `transform.apply(model)` swaps modules so the model runs `name` (raising a
    BackendError when it cannot run this model exactly), `transform.remove(model)` swaps them back."""
    _REGISTRY[name] = Backend(name, None, packed=packed, transform=transform)


def backends() -> list[str]:
    """Every name `model.set_attention` accepts: attention functions, `auto` and `fused`."""
    return sorted(_REGISTRY)


def functions() -> list[str]:
    """The attention functions alone (what `audit` compares layer by layer)."""
    return sorted(n for n, b in _REGISTRY.items() if b.fn is not None and b.transform is None)


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise BackendError(f"unknown attention backend {name!r}; registered: {', '.join(backends())}")
    return _REGISTRY[name]


def for_call(backend: Backend, attention_mask, output_attentions: bool, variants=frozenset()) -> Backend:
    """The backend that runs this call: the fixed one, or the route's pick for this input and these variants.
    A fixed backend that cannot compute one of the variants is refused by name (never another backend instead)."""
    if backend.route is not None:
        return get(backend.route(attention_mask, output_attentions, frozenset(variants)))
    missing = set(variants) - backend.variants
    if missing:
        able = [n for n, b in _REGISTRY.items() if b.fn is not None and set(variants) <= b.variants]
        raise BackendError(f"attention backend {backend.name!r} cannot compute {', '.join(sorted(missing))} (this "
                           f"model's attention needs {', '.join(sorted(variants))}); backends that can: "
                           f"{', '.join(sorted(able)) or 'none'}, or 'auto'")
    return backend


def use(model, name: str) -> Backend:
    """Make `model` run `name`: undo any model-level transform, then apply the one `name` needs (it checks that it
    can run this model exactly, and raises a BackendError if not)."""
    backend = get(name)
    for other in _REGISTRY.values():
        if other.transform is not None and other is not backend:
            other.transform.remove(model)
    if backend.transform is not None:
        backend.transform.apply(model)
    return backend


from .auto import auto  # noqa: E402
from .batch import INT_DTYPES, Batch, Packing, cache_length, check_ids, check_mask, check_positions  # noqa: E402
from .cache import KVCache  # noqa: E402
from .flash import flash  # noqa: E402
from .flex_attention import flex  # noqa: E402
from .naive import naive  # noqa: E402
from .sdpa import sdpa  # noqa: E402
from .tiled import tiled  # noqa: E402
from .varlen import varlen  # noqa: E402

_ALL, _BIASES = frozenset(CAPABILITIES), frozenset({"window", "alibi", "relative", "vdim"})
_REGISTRY.update({
    "naive": Backend("naive", naive, probs=True, variants=_ALL),
    "sdpa": Backend("sdpa", sdpa, variants=_BIASES),                # windows and biases through its mask
    "flash": Backend("flash", flash, variants=frozenset({"window"})),   # a boolean mask, where the kernel takes one
    "varlen": Backend("varlen", varlen, packed=True, variants=_BIASES),
    "tiled": Backend("tiled", tiled, variants=_ALL),
    "flex": Backend("flex", flex, variants=_ALL),
    "auto": Backend("auto", None, route=auto),
})

__all__ = ["AttnMask", "RelativeBias", "VARIANTS", "CAPABILITIES", "Backend", "Batch", "KVCache", "Packing", "backends", "functions", "get", "register",
           "register_transform", "for_call", "use", "INT_DTYPES", "check_ids", "check_mask", "check_positions", "cache_length",
           "naive", "sdpa", "flash", "varlen", "tiled", "flex", "auto"]
