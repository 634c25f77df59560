"""Every registered backend against the naive spec on raw q/k/v: padding, empty rows, causal, GQA, packed."""
import pytest
import torch

from minibt import attention
from minibt.attention import AttnMask
from minibt.errors import BackendError
from minibt.attention import Packing

PADDED = ["sdpa", "flash", "varlen"]


def qkv(b=3, hq=4, hkv=4, sq=7, skv=7, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g, dtype=dtype), torch.randn(b, hkv, skv, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, skv, d, generator=g, dtype=dtype))


def padding(lengths, width, left=False):
    m = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        m[i, slice(width - n, width) if left else slice(0, n)] = True
    return m


@pytest.mark.parametrize("name", PADDED)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_backend_matches_naive(name, causal, hkv):
    q, k, v = qkv(hkv=hkv)
    kp = padding([7, 3, 0], 7, left=causal)           # decoders left-pad; a fully padded row
    mask = AttnMask(kp, causal=causal)
    want = attention.naive(q, k, v, mask=mask, scale=0.3)
    got = attention.get(name).fn(q, k, v, mask=AttnMask(kp, causal=causal), scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.isfinite(got).all() and got[2].abs().max() == 0


@pytest.mark.parametrize("name", ["naive", "sdpa", "flash", "varlen"])
def test_decode_step_with_offset(name):
    """One new query at position 6 of 7 cached keys, left padding in the cache."""
    q, k, v = qkv(sq=1, skv=7, hkv=2)
    kp = padding([7, 4, 1], 7, left=True)
    want = attention.naive(q, k, v, mask=AttnMask(kp, causal=True, q_offset=6), scale=0.35)
    got = attention.get(name).fn(q, k, v, mask=AttnMask(kp, causal=True, q_offset=6), scale=0.35)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", attention.functions())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(7, 3, 0), (7, 7, 7), (1, 1, 1)])
def test_packed_batch_matches_padded(name, causal, lengths):
    """A packed batch (B = 1, cu_seqlens) gives each sequence the answer it gets padded."""
    q, k, v = qkv(hkv=2)
    kp = padding(lengths, 7)
    want = attention.naive(q, k, v, mask=AttnMask(kp, causal=causal), scale=0.3)
    pack = Packing(kp)
    pq, pk, pv = (pack.pack(t.transpose(1, 2)).transpose(1, 2) for t in (q, k, v))     # (1, H, T, D)
    got = attention.get(name).fn(pq, pk, pv, mask=AttnMask(causal=causal, cu_seqlens=pack.cu_seqlens), scale=0.3)
    torch.testing.assert_close(pack.unpack(got.transpose(1, 2)).transpose(1, 2), want * kp[:, None, :, None],
                               atol=1e-5, rtol=0)


def test_naive_no_nan_and_probs():
    q, k, v = qkv()
    out, probs = attention.naive(q, k, v, mask=AttnMask(padding([7, 2, 0], 7)), scale=0.3, return_probs=True)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    torch.testing.assert_close(probs[:2].sum(-1), torch.ones(2, 4, 7))
    assert probs[2].abs().sum() == 0 and probs[1, :, :, 2:].abs().sum() == 0


def test_naive_is_the_textbook_formula():
    """The spec itself, checked against softmax(q k^T * scale) v written out with no mask at all."""
    q, k, v = qkv()
    want = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v
    torch.testing.assert_close(attention.naive(q, k, v, mask=AttnMask(), scale=0.3), want)


def test_registry_and_user_backend():
    assert {"naive", "sdpa", "flash", "varlen"} <= set(attention.backends())
    calls = []

    def mine(q, k, v, *, mask, scale):
        calls.append(q.shape)
        return attention.naive(q, k, v, mask=mask, scale=scale)
    attention.register("mine-test", mine)
    try:
        assert "mine-test" in attention.backends()
        q, k, v = qkv()
        attention.get("mine-test").fn(q, k, v, mask=AttnMask(), scale=1.0)
        assert calls
    finally:
        attention._REGISTRY.pop("mine-test")
    with pytest.raises(BackendError, match="registered"):
        attention.get("nope")


def test_bf16_backends_close_to_naive():
    q, k, v = qkv(dtype=torch.bfloat16, hkv=2)
    kp = padding([7, 3, 1], 7)
    want = attention.naive(q, k, v, mask=AttnMask(kp), scale=0.3).float()
    for name in PADDED:
        got = attention.get(name).fn(q, k, v, mask=AttnMask(kp), scale=0.3).float()
        assert (got - want).abs().max() < 2e-2
