"""The conformance kit generates every mask state the models build, so a backend that assumes a tensor mask, or
that cannot take a packed batch, fails the kit instead of crashing later inside a model."""
import pytest
import torch

import minibt
from minibt.attention.testing import BackendMismatch, _case, check_backend, model_mask


def assumes_a_tensor_mask(q, k, v, *, mask, scale):
    """Right whenever allowed() is a tensor; crashes on the no-padding case, where it is None."""
    allowed = mask.allowed(q.shape[2], k.shape[2])
    rep = q.shape[1] // k.shape[1]
    s = (q.float() @ k.float().repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1))
    return (p @ v.float().repeat_interleave(rep, 1)).to(q.dtype)


def ignores_cu_seqlens(q, k, v, *, mask, scale):
    """Right on padded batches; on a packed one, attends across sequence boundaries."""
    if mask.packed:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True,
                                                                is_causal=mask.causal)
    return minibt.attention.naive(q, k, v, mask=mask, scale=scale)


def test_kit_fails_a_backend_that_assumes_a_tensor_mask():
    with pytest.raises(BackendMismatch, match="raised TypeError") as e:
        check_backend(assumes_a_tensor_mask, max_examples=150)
    assert "first failing case" in str(e.value)


def test_kit_fails_a_backend_that_ignores_packing():
    with pytest.raises(BackendMismatch, match="max abs error"):
        check_backend(ignores_cu_seqlens, max_examples=150)


def test_kit_covers_every_mask_state():
    """Over the generated cases: allowed() None (no padding, not causal; one decode query after all keys), plain
    causal without padding, causal with a decode offset, padded, packed."""
    from hypothesis import given, settings, HealthCheck
    from hypothesis import strategies as st
    seen = set()

    @settings(max_examples=300, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.composite(_case)())
    def collect(c):
        m = model_mask(c)
        sq, skv = c["sq"], c["skv"]
        if c["layout"] == "packed":
            seen.add("packed")
        if m.allowed(sq, skv) is None:
            seen.add("no mask tensor")
        if m.plain_causal(sq, skv):
            seen.add("plain causal")
        if m.q_offset > 0 and m.key_padding is None:
            seen.add("decode offset, no padding")
        if m.key_padding is not None:
            seen.add("padded")
    collect()
    assert seen == {"packed", "no mask tensor", "plain causal", "decode offset, no padding", "padded"}
