"""Attention variants: naive is their definition (checked here against the formulas written out by hand), every
backend computes the ones it declares exactly (the conformance kit, every combination), refuses the others by
name, and `auto` routes to one that can."""
from __future__ import annotations

import math

import pytest
import torch

from minibt import attention
from minibt.attention import AttnMask, Batch, RelativeBias, naive
from minibt.attention.testing import BackendMismatch, check_backend, relative_bucket
from minibt.errors import BackendError

import minibt.attention.flex_attention as flex_module               # eager in tests: conftest.py eager_flex


def by_hand(q, k, v, scale, *, causal=False, window=None, alibi=None, table=None, softcap=None, sinks=None):
    """One head at a time, one query at a time, written from the papers' formulas with Python floats."""
    b, hq, sq, d = q.shape
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)
    offset = k.shape[2] - sq
    for bi in range(b):
        for h in range(hq):
            for i in range(sq):
                qi = offset + i
                logits, values = [], []
                for j in range(k.shape[2]):
                    if causal and j > qi:
                        continue
                    if window is not None and not (qi - window[0] <= j <= qi + window[1]):
                        continue
                    s = scale * float(q[bi, h, i] @ k[bi, h, j])
                    if alibi is not None:
                        s -= float(alibi[h]) * abs(qi - j)
                    if table is not None:
                        s += float(table[relative_bucket(torch.tensor(j - qi)), h])
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    logits.append(s)
                    values.append(v[bi, h, j].double())
                denominator = sum(math.exp(s) for s in logits) + (math.exp(float(sinks[h])) if sinks is not None else 0)
                for s, value in zip(logits, values):
                    out[bi, h, i] += math.exp(s) / denominator * value
    return out


VARIANTS = [dict(), dict(causal=True, window=(3, 0)), dict(window=(2, 2)), dict(causal=True, alibi=True),
            dict(alibi=True), dict(table=True), dict(causal=True, softcap=1.5), dict(causal=True, sinks=True),
            dict(causal=True, window=(4, 0), softcap=2.0, sinks=True)]


@pytest.mark.parametrize("case", VARIANTS, ids=lambda c: "+".join(c) or "plain")
def test_naive_is_the_formula(case):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 3)      # a decode offset of 2
    data = dict(alibi=torch.tensor([0.5, 0.25]), table=torch.randn(17, 2), sinks=torch.tensor([0.3, -1.0]))
    kw = {name: data[name] if value is True and name in data else value for name, value in case.items()}
    mask = AttnMask(causal=kw.pop("causal", False), q_offset=2).with_variants(
        window=kw.get("window"), alibi=kw.get("alibi"), softcap=kw.get("softcap"), sinks=kw.get("sinks"),
        relative=RelativeBias(kw["table"], relative_bucket) if "table" in kw else None)
    want = by_hand(q, k, v, 0.5, causal=mask.causal, **kw)
    torch.testing.assert_close(naive(q, k, v, mask=mask, scale=0.5).double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in attention.functions() if n != "naive"])
def test_every_backend_computes_its_variants(name):
    backend = attention.get(name)
    report = check_backend(backend.fn, name=name, packed=backend.packed, variants=backend.variants,
                           max_examples=60 if name == "flex" else 120)
    assert report.failure is None and "all within tolerance" in str(report)


def ignores_the_window(q, k, v, *, mask, scale):
    return naive(q, k, v, mask=mask.with_variants(alibi=mask.alibi, relative=mask.relative, softcap=mask.softcap,
                                                  sinks=mask.sinks), scale=scale)


def drops_the_sinks(q, k, v, *, mask, scale):
    return naive(q, k, v, mask=mask.with_variants(window=mask.window, alibi=mask.alibi, relative=mask.relative,
                                                  softcap=mask.softcap), scale=scale)


@pytest.mark.parametrize("fn, variants", [(ignores_the_window, ("window",)), (drops_the_sinks, ("sinks",))])
def test_kit_catches_a_backend_that_ignores_a_variant(fn, variants):
    with pytest.raises(BackendMismatch, match="max abs error"):
        check_backend(fn, variants=variants, max_examples=150)


def test_a_backend_is_refused_a_variant_by_name_and_auto_routes():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(BackendError, match="'sdpa' cannot compute softcap.*backends that can: .*flex.*tiled"):
        Batch(mask, (2, 5), attention.get("sdpa"), causal=True).attend(q, k, v, scale=0.3, softcap=5.0)
    with pytest.raises(BackendError, match="'flash' cannot compute alibi"):
        Batch(mask, (2, 5), attention.get("flash")).attend(q, k, v, scale=0.3, alibi=torch.ones(4))
    batch = Batch(mask, (2, 5), attention.get("auto"), causal=True)
    out, _ = batch.attend(q, k, v, scale=0.3, softcap=5.0, window=(2, 0))
    assert batch._backends[frozenset({"softcap", "window"})].name == "tiled"
    want = naive(q, k, v, mask=AttnMask(causal=True).with_variants(softcap=5.0, window=(2, 0)), scale=0.3)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    assert batch._backends[frozenset()].name == "sdpa"                   # no padding, no variant


def test_user_backends_declare_their_variants():
    attention.register("windows-only-test", lambda q, k, v, *, mask, scale: naive(q, k, v, mask=mask, scale=scale),
                       variants=("window",))
    try:
        assert attention.get("windows-only-test").variants == {"window"}
        with pytest.raises(BackendError, match="unknown variants"):
            attention.register("bad-test", naive, variants=("dilation",))
        q = torch.randn(1, 2, 4, 8)
        batch = Batch(torch.ones(1, 4, dtype=torch.long), (1, 4), attention.get("windows-only-test"))
        batch.attend(q, q, q, scale=0.3, window=(1, 1))
        with pytest.raises(BackendError, match="cannot compute sinks"):
            batch.attend(q, q, q, scale=0.3, sinks=torch.zeros(2))
    finally:
        attention._REGISTRY.pop("windows-only-test", None)


def test_compiled_flex_matches_naive_on_every_variant(monkeypatch):
    """The default, compiled flex (shapes padded to 128-blocks), on one case with every variant at once."""
    monkeypatch.setattr(flex_module, "COMPILED", True)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 70, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    keys = torch.ones(2, 70, dtype=torch.bool)
    keys[1, :30] = False                                                  # left padding
    mask = AttnMask(keys, causal=True).with_variants(
        window=(15, 0), alibi=torch.rand(4), relative=RelativeBias(torch.randn(17, 4), relative_bucket),
        softcap=5.0, sinks=torch.randn(4))
    with torch.no_grad():
        got = attention.get("flex").fn(q, k, v, mask=mask, scale=0.25)
    want = naive(q, k, v, mask=mask, scale=0.25)
    torch.testing.assert_close(got.transpose(1, 2)[keys], want.transpose(1, 2)[keys], atol=1e-5, rtol=0)
    with pytest.raises(BackendError, match="inference only"):
        attention.get("flex").fn(q.requires_grad_(), k, v, mask=mask, scale=0.25)


def test_compiled_flex_never_falls_back_to_eager_silently(monkeypatch):
    """Decode steps (a new query offset each) reuse one compiled graph; a new shape past dynamo's recompile limit
    is a BackendError that says so, not a silent eager run."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(flex_module, "COMPILED", True)
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    counters.clear()
    with torch.no_grad():
        for past in (5, 6, 7):                                            # three decode steps, one graph
            q, kv = torch.randn(1, 4, 1, 16), torch.randn(1, 2, past + 1, 16)
            attention.get("flex").fn(q, kv, kv, mask=AttnMask(causal=True, q_offset=past).with_variants(
                window=(3, 0), sinks=torch.randn(4)), scale=0.25)
        assert counters["stats"]["unique_graphs"] == 1
        q = torch.randn(2, 4, 200, 16)                                    # another shape: past the limit of 1
        with pytest.raises(BackendError, match="recompile limit.*COMPILED = False"):
            attention.get("flex").fn(q, q[:, :2], q[:, :2], mask=AttnMask(causal=True), scale=0.25)
    torch._dynamo.reset()
