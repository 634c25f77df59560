"""Every kernel transform against the plain form it replaces (minibt/kernels/__init__.py lists them)."""
import pytest
import torch
import torch.nn.functional as F

import minibt
from minibt import kernels
from minibt.kernels import decode_linear, onednn_linear, rmsnorm
from conftest import left_padded, ragged_batch


@pytest.mark.parametrize("name", ["llama-gqa", "llama3-mqa-tied-bias-headdim", "opt-post-ln-projected"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimize_equals_the_plain_model(tiny_decoder, name, dtype):
    """from_hub's default transforms (decode linears, column-major fp32, RMSNorm as LayerNorm) against the plain
    reference model (optimize=False): prefill logits, and greedy generation token for token."""
    folder, _ = tiny_decoder(name)
    plain = minibt.from_hub(folder, dtype=dtype, optimize=False)
    fast = minibt.from_hub(folder, dtype=dtype)
    assert not any(type(m) is decode_linear.DecodeLinear for m in plain.modules())
    assert any(type(m) is decode_linear.DecodeLinear for m in fast.modules())
    if name.startswith("llama"):
        assert any(isinstance(m, rmsnorm.LayerNormRMS) for m in fast.modules())
    if dtype == torch.float32:            # fp32 weights kept column-major (same values, other strides)
        w = fast.layers[0].attention.qkv.weight
        assert w.stride() == (1, w.shape[0])
        assert fast.tied() == {} or fast.lm_head.weight is fast.embed.weight     # still tied after the re-layout
    ids, mask = left_padded(99, 0)
    with torch.no_grad():
        want, got = plain(ids, attention_mask=mask).logits, fast(ids, attention_mask=mask).logits
    real = mask.bool()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (got[real].float() - want[real].float()).abs().max() <= tol * max(1.0, want[real].abs().max().item())
    if dtype == torch.float32:
        assert torch.equal(plain.generate(ids, attention_mask=mask, max_new_tokens=6),
                           fast.generate(ids, attention_mask=mask, max_new_tokens=6))


def test_optimize_gives_encoders_only_the_packed_linears(tiny):
    model = minibt.from_hub(tiny("BertModel")[0])
    assert not any(type(m) is decode_linear.DecodeLinear for m in model.modules())
    assert set(kernels.DEFAULT) == {"decode_linear", "rmsnorm", "onednn_linear"}
    packed = any(type(m) is onednn_linear.PackedLinear for m in model.modules())
    assert packed == onednn_linear.NOT_INTEL                     # MKL stays where it was measured the faster


@pytest.mark.parametrize("arch", ["BertModel", "ModernBertModel"])
def test_packed_linears_equal_the_plain_encoder(tiny, arch, monkeypatch):
    """The onednn_linear transform (forced on, whatever the CPU) against from_hub(optimize=False): same outputs
    within fp32 rounding, in inference and with gradients on (where F.linear runs); a weight changed in place is
    packed again."""
    monkeypatch.setattr(onednn_linear, "NOT_INTEL", True)
    folder = tiny(arch)[0]
    plain, fast = minibt.from_hub(folder, optimize=False), minibt.from_hub(folder)
    assert any(type(m) is onednn_linear.PackedLinear for m in fast.modules())
    ids, mask = ragged_batch(fast.config.vocab_size, 0)
    with torch.inference_mode():
        want, got = plain(ids, attention_mask=mask).last_hidden_state, fast(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(ids, attention_mask=mask).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    layer = next(m for m in fast.modules() if type(m) is onednn_linear.PackedLinear)
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        layer.weight.mul_(2)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_fused_transform_swaps_and_restores_the_stack(tiny):
    from minibt.kernels.fused_encoder import FusedEncoder
    from minibt.models.bert import LayerStack
    folder, _ = tiny("BertModel")
    model = minibt.from_hub(folder, attn="fused")
    layers = list(model.layers)
    assert isinstance(model.layers, FusedEncoder) and not model.layers.training
    ids, mask = ragged_batch(99, 0)
    with torch.no_grad():
        fused = model(ids, attention_mask=mask).last_hidden_state
        model.set_attention("naive")
        assert type(model.layers) is LayerStack and list(model.layers) == layers     # same modules back
        plain = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    assert set(dict(model.named_parameters())) == set(dict(minibt.from_hub(folder).named_parameters()))


@pytest.mark.parametrize("rows", [1, 4, 16, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_paths_agree_with_linear(rows, bias):
    """bf16 one-token (mv) and few-token (W @ x^T) paths compute the same product as nn.Linear."""
    from minibt.kernels.decode_linear import DecodeLinear
    torch.manual_seed(0)
    lin = DecodeLinear(64, 96, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 1, 64).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    got = lin(x)
    assert got.shape == (rows, 1, 96) and got.dtype == torch.bfloat16
    assert got.is_contiguous()      # row-major, as linear's: a column-major q sends SDPA to its slow math path
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 100, 576])
def test_rmsnorm_matches_the_textbook_formula(dtype, dim):
    """The rmsnorm transform (one LayerNorm over [x, -x]) and the model file's RMSNorm against HF's written-out steps: fp32 statistics, the normalised
    value rounded to the model's dtype, then times the weight. bf16: bit-identical; fp32: within 1e-6."""
    from minibt.kernels.rmsnorm import LayerNormRMS
    from minibt.models.llama import RMSNorm
    torch.manual_seed(0)
    plain = RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        plain.weight.copy_(torch.rand(dim) + 0.5)
    plain = plain.to(dtype)
    norm = LayerNormRMS(plain)
    x = (torch.randn(3, 7, dim) * torch.rand(3, 7, 1) * 10).to(dtype)
    h = x.float()
    want = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(plain(x), want)                   # the model file's RMSNorm is the textbook formula
    got = norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() < 1e-6 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_in_a_compiled_step_is_the_linear(dtype, bias):
    """decode_linear.one_row (what DecodeLinear and Int8Linear take for one row inside torch.compile) against the
    plain product in float64 on the same weights: fp32 within 1e-5 of the largest output, bf16 / int8 (bf16 output)
    within bf16 rounding. Two rows take the ordinary path (also checked)."""
    from minibt.kernels.decode_linear import DecodeLinear, one_row, over
    from minibt.kernels.quantize import Int8Linear
    torch.manual_seed(0)
    plain = torch.nn.Linear(576, 200, bias=bias)
    if dtype == "int8":
        lin, act = Int8Linear.from_weight(plain.weight, plain.bias), torch.float32
        w64 = lin.qweight.double() * lin.scale_bf16.double()[:, None]     # the scales the kernels use
    else:
        lin, act = over(DecodeLinear, plain, torch.nn.Parameter(plain.weight.detach().to(dtype))), dtype
        lin.bias = None if plain.bias is None else torch.nn.Parameter(plain.bias.detach().to(dtype))
        w64 = lin.weight.double()
    torch._dynamo.reset()                   # one code object for every parameter: dynamo's recompile limit is 8
    step = torch.compile(lambda x: lin(x), fullgraph=True, dynamic=False)
    for rows in (1, 2):
        x = torch.randn(rows, 1, 576).to(act)
        xin = x.to(torch.bfloat16) if dtype == "int8" else x      # int8 layers compute with bf16 activations
        want = xin.double() @ w64.t() + (0 if lin.bias is None else lin.bias.double())
        with torch.no_grad():
            got = step(x)
        assert got.shape == (rows, 1, 200) and got.dtype == act
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        assert (got.double() - want).abs().max() <= tol * want.abs().max()
    eager = one_row(x[:1].to(act), w64.to(act), None)            # the eager form is the same maths
    assert (eager.double() - xin[:1].double() @ w64.to(act).double().t()).abs().max() <= tol * want.abs().max()


def test_row_major_keeps_tied_weights_and_the_outputs(tiny_decoder):
    """decode_linear.row_major undoes the fp32 column-major layout: every weight contiguous, the tied LM head still
    the embedding's tensor, the logits unchanged."""
    from minibt.kernels.decode_linear import row_major
    folder, _ = tiny_decoder("llama3-mqa-tied-bias-headdim")
    model = minibt.from_hub(folder)
    ids = torch.tensor([[5, 9, 2, 7]])
    before = model(ids).logits
    assert not model.embed.weight.is_contiguous()
    row_major(model)
    assert all(p.is_contiguous() for p in model.parameters())
    assert model.lm_head.weight is model.embed.weight
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
