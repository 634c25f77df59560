"""Conformance kit: check an attention backend against the naive spec over many generated cases.

    from minibt.attention.testing import check_backend
    report = check_backend(my_fn)            # raises BackendMismatch (with the report) on the first failing case

Cases are drawn by hypothesis (a test dependency: pip install hypothesis): batch, heads with GQA groups, lengths,
head dim, dtype (fp32, bf16), padding pattern (none, ragged right, left, fully padded rows, length-1 rows), causal or
not, a decode step (queries offset inside the keys), the scale, and the layout: padded, or packed (B = 1, S = T with
cu_seqlens; always for `packed` backends). Every mask state the models build is generated: no padding at all
(key_padding None, so `mask.allowed()` is None when not causal, or for one decode query after every key), plain
causal without padding, causal with a decode offset, padded, and packed. A backend that raises is a failure too.

With `variants` (the names a backend declares, e.g. attention.get("flex").variants), each case also draws any
combination of them, so the ones real models put together are all generated: a causal window (Mistral) or a
bidirectional one (ModernBERT), ALiBi slopes (BLOOM), a relative-bucket table (MPNet), a softcap with a window
(Gemma 2), sinks with a window (gpt-oss), values of another head dim (MLA), on top of padding, packing, GQA and
decode steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import BackendError
from .batch import Packing
from .mask import AttnMask, RelativeBias
from .naive import naive

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


class BackendMismatch(BackendError):
    """A backend disagreed with naive; the message is the report."""


@dataclass
class Report:
    name: str
    cases: int = 0
    worst: dict = field(default_factory=dict)          # dtype -> (max abs error, case)
    failure: str | None = None

    def __str__(self):
        lines = [f"backend {self.name}: {self.cases} cases, " + ("FAILED" if self.failure else "all within tolerance")]
        for dtype, (err, case) in self.worst.items():
            lines.append(f"  {str(dtype).removeprefix('torch.')}: worst max abs error {err:.2e} "
                         f"(tolerance {TOLERANCE[dtype]:.0e}) at {case}")
        if self.failure:
            lines.append("  first failing case: " + self.failure)
        return "\n".join(lines)


def relative_bucket(distance):
    """A T5-style bucket function for the kit's relative-position tables: signed distances clamped to [-8, 8]."""
    return distance.clamp(-8, 8) + 8


def _case(draw, variants=()):
    from hypothesis import strategies as st
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4]))
    b = draw(st.integers(1, 4))
    skv = draw(st.integers(1, 40))
    decode = draw(st.booleans())
    sq = draw(st.sampled_from([1, skv] if skv <= 3 else [1, min(3, skv)])) if decode else skv
    causal = decode or draw(st.booleans())
    pattern = draw(st.sampled_from(["none", "none", "right", "left", "empty-row", "length-1"]))
    lengths = [draw(st.integers(1, skv)) for _ in range(b)]
    if pattern == "none":                      # no padding at all: the mask carries no tensor (allowed() may be None)
        lengths = [skv] * b
    elif pattern == "empty-row":
        lengths[draw(st.integers(0, b - 1))] = 0
    elif pattern == "length-1":
        lengths[0] = 1
    # a packed batch (B = 1, S = T, cu_seqlens) is what the models give every backend under varlen's prefill
    layout = "packed" if not decode and draw(st.booleans()) else "padded"
    chosen = draw(st.sets(st.sampled_from(sorted(variants)))) if variants else set()
    d = draw(st.sampled_from([8, 16, 32]))
    width = draw(st.integers(1, 12))
    return dict(b=b, hq=hkv * group, hkv=hkv, sq=sq, skv=skv, d=d, dv=d + 8 if "vdim" in chosen else d,
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), causal=causal,
                left=pattern == "left" or (decode and pattern != "none"), lengths=lengths, layout=layout,
                scale=draw(st.sampled_from([None, 0.1, 1.0])), seed=draw(st.integers(0, 2**16)),
                window=((width - 1, 0) if causal else (width, draw(st.sampled_from([width, 0, None]))))
                if "window" in chosen else None,
                softcap=draw(st.sampled_from([2.0, 5.0, 30.0])) if "softcap" in chosen else None,
                **{name: name in chosen for name in ("alibi", "relative", "sinks")})


def _variants(c: dict, g: torch.Generator) -> dict:
    """The case's variants as AttnMask data: slopes, a bucket table and sinks drawn from its seed."""
    out = dict(window=c["window"], softcap=c["softcap"])
    if c["alibi"]:
        out["alibi"] = torch.rand(c["hq"], generator=g)
    if c["relative"]:
        out["relative"] = RelativeBias(torch.randn(17, c["hq"], generator=g), relative_bucket)
    if c["sinks"]:
        out["sinks"] = torch.randn(c["hq"], generator=g) * 2
    return out


def model_mask(c: dict, variants: dict | None = None) -> AttnMask:
    """The AttnMask a model builds for this case: key_padding None when no row has padding (then allowed() is
    None unless causal), q_offset for a decode step, and the layer's variants."""
    keys = _keys(c)
    mask = AttnMask(None if bool(keys.all()) else keys, causal=c["causal"], q_offset=c["skv"] - c["sq"])
    return mask.with_variants(**variants) if variants else mask


def _keys(c: dict) -> torch.Tensor:
    keys = torch.zeros(c["b"], c["skv"], dtype=torch.bool)
    for i, n in enumerate(c["lengths"]):
        keys[i, slice(c["skv"] - n, c["skv"]) if c["left"] else slice(0, n)] = True
    return keys


def _run(fn, packed: bool, c: dict):
    """(backend output, naive output, real-row mask) for one case, both in the padded (B, Hq, Sq, D) layout."""
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["b"], c["hq"], c["sq"], c["d"], generator=g).to(c["dtype"])
    k = torch.randn(c["b"], c["hkv"], c["skv"], c["d"], generator=g).to(c["dtype"])
    v = torch.randn(c["b"], c["hkv"], c["skv"], c["dv"], generator=g).to(c["dtype"])
    variants = _variants(c, g)
    keys = _keys(c)
    scale = c["scale"] if c["scale"] is not None else c["d"] ** -0.5
    offset = c["skv"] - c["sq"]
    want = naive(q, k, v, mask=model_mask(c, variants), scale=scale)
    rows = keys[:, offset:]                                               # queries that are real tokens
    if offset == 0 and (packed or c["layout"] == "packed"):               # packed backends always take this layout
        pack = Packing(keys)
        pq, pk, pv = (pack.pack(t.transpose(1, 2)).transpose(1, 2) for t in (q, k, v))
        mask = AttnMask(causal=c["causal"], cu_seqlens=pack.cu_seqlens).with_variants(**variants)
        got = pack.unpack(fn(pq, pk, pv, mask=mask, scale=scale).transpose(1, 2)).transpose(1, 2)
    else:
        got = fn(q, k, v, mask=model_mask(c, variants), scale=scale)
    return got, want, rows


def check_backend(fn, *, name: str | None = None, packed: bool = False, max_examples: int = 150,
                  variants=()) -> Report:
    """Compare `fn(q, k, v, *, mask, scale)` to naive on generated cases; returns the Report or raises
    BackendMismatch. Only real query rows are compared; a row with no key must be exactly zero. variants: the
    attention variants to generate as well (those the backend declares; see the module docstring)."""
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st
    except ImportError:
        raise BackendError("check_backend needs hypothesis: pip install hypothesis") from None
    report = Report(name or getattr(fn, "__name__", "backend"))

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.composite(_case)(tuple(variants)))
    def one(c):
        shown = {k: (str(v).removeprefix("torch.") if k == "dtype" else v) for k, v in c.items()}
        report.cases += 1
        try:
            got, want, rows = _run(fn, packed, c)
        except Exception as e:                     # a crash is a failure of the backend, reported like one
            report.failure = f"raised {type(e).__name__}: {e}; case {shown}"
            raise AssertionError(report.failure) from None
        if got.shape != want.shape:
            report.failure = f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}; case {shown}"
            raise AssertionError(report.failure)
        if not torch.isfinite(got).all():
            report.failure = f"non-finite output (NaN/inf); case {shown}"
            raise AssertionError(report.failure)
        err = (got.float() - want.float()).transpose(1, 2)[rows].abs().max().item() if rows.any() else 0.0
        if err > report.worst.get(c["dtype"], (-1, None))[0]:
            report.worst[c["dtype"]] = (err, shown)
        if err > TOLERANCE[c["dtype"]]:
            report.failure = f"max abs error {err:.2e} > {TOLERANCE[c['dtype']]:.0e}; case {shown}"
            raise AssertionError(report.failure)

    try:
        one()
    except AssertionError:
        raise BackendMismatch(str(report)) from None
    return report
