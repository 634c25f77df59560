"""The conformance kit passes every built-in backend and catches broken ones."""
import pytest
import torch.nn.functional as F

from minibt import attention
from minibt.attention import naive
from minibt.attention.testing import BackendMismatch, check_backend


@pytest.mark.parametrize("name", [n for n in attention.functions() if n != "naive"])
def test_builtin_backends_conform(name):
    backend = attention.get(name)
    report = check_backend(backend.fn, name=name, packed=backend.packed, max_examples=120)
    assert report.cases == 120 and report.failure is None
    assert "all within tolerance" in str(report)


def ignores_padding(q, k, v, *, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def breaks_on_gqa(q, k, v, *, mask, scale):
    if q.shape[1] != k.shape[1]:                       # pairs query head i with kv head i % Hkv (wrong grouping)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1)
    return naive(q, k, v, mask=mask, scale=scale)


def nan_on_empty_rows(q, k, v, *, mask, scale):
    allowed = mask.allowed(q.shape[2], k.shape[2])
    s = (q.float() @ k.float().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ v.float().repeat_interleave(q.shape[1] // k.shape[1], 1)).to(q.dtype)


@pytest.mark.parametrize("fn, what", [(ignores_padding, "max abs error"), (breaks_on_gqa, "max abs error"),
                                      (nan_on_empty_rows, "non-finite")])
def test_kit_catches_broken_backends(fn, what):
    with pytest.raises(BackendMismatch, match=what) as e:
        check_backend(fn, max_examples=200)
    assert "first failing case" in str(e.value)
