"""The CUDA side: every backend, fused and generation on the GPU in fp16/bf16 against the CPU fp32 reference and
transformers. Runs where CUDA is present; on a CPU-only machine every test here is skipped (one clean reason)."""
import pytest
import torch

import minibt
from minibt import attention
from minibt.attention import AttnMask
from conftest import left_padded, ragged_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}          # relative to the reference's largest value


def close(got, want, dtype):
    got, want = got.float().cpu(), want.float().cpu()
    return (got - want).abs().max().item() <= TOL[dtype] * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", attention.functions())
def test_backends_on_cuda_match_naive_fp32(name, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 9, 32, generator=g) for _ in range(3))
    lengths = [9, 4, 1]
    keys = torch.zeros(3, 9, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keys[i, :n] = True
    for causal in (False, True):
        want = attention.naive(q, k, v, mask=AttnMask(keys, causal=causal), scale=0.2)
        backend = attention.get(name)
        if backend.packed:
            from minibt.attention import Packing
            pack = Packing(keys.cuda())
            pq, pk, pv = (pack.pack(t.cuda().to(dtype).transpose(1, 2)).transpose(1, 2) for t in (q, k, v))
            got = backend.fn(pq, pk, pv, mask=AttnMask(causal=causal, cu_seqlens=pack.cu_seqlens), scale=0.2)
            got = pack.unpack(got.transpose(1, 2)).transpose(1, 2)
        else:
            qc, kc, vc = (t.cuda().to(dtype) for t in (q, k, v))
            try:
                got = backend.fn(qc, kc, vc, mask=AttnMask(keys.cuda(), causal=causal), scale=0.2)
            except minibt.errors.BackendError as e:        # flash refuses a mask it cannot take: a clear error
                assert name == "flash" and "flash kernel cannot take" in str(e)
                continue
        real = keys[:, :, None, None].expand(-1, -1, 4, 32).transpose(1, 2)
        assert got.device.type == "cuda" and got.dtype == dtype
        assert close(got.cpu().float()[real], want[real], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attn", ["naive", "sdpa", "varlen", "fused", "auto"])
def test_encoder_parity_on_cuda(tiny, attn, dtype):
    folder, ref = tiny("BertModel")
    model = minibt.from_hub(folder, attn=attn, dtype=dtype, device="cuda")
    ids, mask = ragged_batch(99, 0, lengths=(9, 5, 1))
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
    real = mask.bool()
    assert close(got.cpu()[real], want[real], dtype)
    assert torch.equal(got.cpu()[~real], torch.zeros_like(got.cpu()[~real]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_generation_on_cuda(tiny_decoder, attn, dtype):
    folder, ref = tiny_decoder("llama-gqa")
    model = minibt.from_hub(folder, attn=attn, dtype=dtype, device="cuda")
    ids, mask = left_padded(99, 0)
    got = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8).cpu()
    cpu = minibt.from_hub(folder, attn=attn, dtype=dtype).generate(ids, attention_mask=mask, max_new_tokens=8)
    if dtype == torch.float32:
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want[:, :got.shape[1]])
    else:       # bf16 greedy may flip a near-tie between devices: most tokens agree
        assert (got == cpu).float().mean() > 0.8
