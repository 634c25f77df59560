"""Quantized linear layers (minibt/kernels/quantize.py): error bounds, real-model accuracy, save/load, backends."""
import json

import pytest
import torch
import torch.nn.functional as F

import minibt
import real_corpus
from minibt import attention
from minibt.kernels.quantize import (Int4Linear, Int8Linear, QuantizeError, W8A8Linear, int4_group_size, quantize,
                                     save_quantized, QUANTIZED_FILE)
from conftest import left_padded, ragged_batch

# Documented error of one quantized linear against the float one (relative Frobenius norm of the output, random
# Gaussian weights and inputs): int8 per-channel + bf16 activations ~0.5%, int4 groups of 32-64 ~6.5%.
BOUND = {"int8": 0.01, "int4": 0.08}
CLASSES = {"int8": Int8Linear, "int4": Int4Linear}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])        # the GEMV kernel, its upper end, and the many-rows route
def test_linear_within_documented_error(scheme, dtype, rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 960).to(dtype)
    q = CLASSES[scheme].from_weight(lin.weight, lin.bias)
    x = torch.randn(2, rows, 576, dtype=dtype)
    ref, out = lin(x).float(), q(x)
    assert out.dtype == dtype and out.shape == (2, rows, 960)
    assert ((out.float() - ref).norm() / ref.norm()).item() < BOUND[scheme]
    # and it is the dequantized weight's product, up to bf16 rounding of the activations
    exact = F.linear(x.float(), q.dequantize(), lin.bias.float())
    assert ((out.float() - exact).norm() / exact.norm()).item() < 1e-2


def test_int8_weight_error_is_half_a_step():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear.from_weight(lin.weight, lin.bias)
    step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert bool(((q.dequantize() - lin.weight).abs() <= step / 2 + 1e-7).all())


def test_chunked_quantization_equals_whole_matrix_and_leaves_the_weight_alone():
    """Layers taller than CHUNK_ROWS (an LM head) are quantized in row chunks: same codes and scales as the one-shot
    formulas of the module docstring, the int4 packing of a ragged tail included; the float weight (a tied
    embedding) is read, never written."""
    from minibt.kernels import quantize as qz
    torch.manual_seed(3)
    w = torch.randn(qz.CHUNK_ROWS + 40, 64)
    keep = w.clone()
    q8, q4 = Int8Linear.from_weight(w), Int4Linear.from_weight(w)
    assert torch.equal(w, keep)
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    assert torch.equal(q8.scale, scale)
    assert torch.equal(q8.qweight, torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
    g = w.view(-1, 2, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    s4 = ((hi - lo).clamp(min=1e-12) / 15).to(torch.bfloat16).float()
    z4 = (lo + 8 * s4).to(torch.bfloat16).float()
    codes = torch.round((g - z4[..., None]) / s4[..., None] + 8).clamp(0, 15).to(torch.int32).view(w.shape)
    assert torch.equal(q4.codes()[:w.shape[0]], codes)
    assert torch.equal(q4.dequantize(), ((codes.view(-1, 2, 32) - 8) * s4[..., None] + z4[..., None]).view(w.shape))


def test_int4_group_rule():
    assert int4_group_size(576) == 32 and int4_group_size(1536, group_size=256) == 256
    assert int4_group_size(576, group_size=256) == 64 and int4_group_size(96, group_size=128) == 32
    with pytest.raises(QuantizeError, match="layers.0.down.*in_features=37"):
        int4_group_size(37, "layers.0.down")
    with pytest.raises(QuantizeError, match="group_size=48"):
        int4_group_size(96, group_size=48)


def test_int4_refuses_before_changing_anything(tiny_decoder):
    folder, _ = tiny_decoder("llama-gqa")                 # intermediate_size=37: no group size divides it
    model = minibt.from_hub(folder)
    with pytest.raises(QuantizeError, match=r"layers\.0\.mlp\.down.*in_features=37.*'int8'"):
        quantize(model, "int4")
    assert not any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
    with pytest.raises(QuantizeError, match="int3"):
        minibt.from_hub(folder, quantize="int3")


def test_what_is_quantized_and_tied_embedding_kept(tiny_decoder):
    folder, _ = tiny_decoder("llama3-mqa-tied-bias-headdim")
    fp = minibt.from_hub(folder)
    model = minibt.from_hub(folder, quantize="int8")
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.layers[0].attention.qkv, Int8Linear)
    assert isinstance(model.embed.weight, torch.nn.Parameter) and model.embed.weight.dtype == torch.float32
    assert torch.equal(model.embed.weight, fp.embed.weight)          # the embedding the head was tied to
    assert model.layers[0].norm1.weight.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.Linear) for name, m in model.named_modules() if name.startswith("layers"))
    ids, mask = left_padded(99, 0)
    got, want = model(ids, attention_mask=mask).logits, fp(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).norm() / want[real].norm() < 0.03


def _backends(model):
    return [b for b in attention.backends() if not (b == "fused" and model.family in ("llama", "opt"))]


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_every_backend_runs_on_a_quantized_encoder(tiny, scheme):
    folder, _ = tiny("BertForMaskedLM", intermediate_size=64)       # widths divisible by an int4 group
    model = minibt.from_hub(folder, quantize=scheme)
    ids, mask = ragged_batch(99, 0)
    model.set_attention("naive")
    want = model(ids, attention_mask=mask)
    for name in attention.backends() + ["auto"]:
        with torch.no_grad():                   # flex on CPU is inference only
            out = model.set_attention(name)(ids, attention_mask=mask)
        real = mask.bool()
        # same quantized weights; packed backends see fewer rows, so another kernel route (both with bf16
        # activations), and fused dequantizes to float: bf16-level agreement (the audit's bf16 tolerance)
        torch.testing.assert_close(out.last_hidden_state[real], want.last_hidden_state[real], atol=3e-2, rtol=3e-2,
                                   msg=name)
        assert out.logits.shape == want.logits.shape


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_backend_runs_on_a_quantized_decoder(tiny_decoder, tmp_path, scheme):
    import transformers
    torch.manual_seed(3)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=64)).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = minibt.from_hub(tmp_path, quantize=scheme)
    ids, mask = left_padded(99, 0)
    model.set_attention("naive")
    want = model.generate(ids, attention_mask=mask, max_new_tokens=5)
    for name in _backends(model):
        got = model.set_attention(name).generate(ids, attention_mask=mask, max_new_tokens=5)
        assert torch.equal(got, want), name
    with pytest.raises(minibt.errors.BackendError):
        model.set_attention("fused")


def test_save_load_bit_identical_and_manifest_checks(tmp_path):
    import transformers
    torch.manual_seed(4)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=64, tie_word_embeddings=True)).eval()
    ref.save_pretrained(tmp_path / "fp", safe_serialization=True)
    ids, mask = left_padded(99, 0)
    for scheme in ("int8", "int4"):
        model = minibt.from_hub(tmp_path / "fp", quantize=scheme)
        out = save_quantized(model, tmp_path / scheme)
        back = minibt.from_hub(out)
        assert back.quantization["scheme"] == scheme
        a, b = model.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(model(ids, attention_mask=mask).logits, back(ids, attention_mask=mask).logits)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4),
                           back.generate(ids, attention_mask=mask, max_new_tokens=4))
        # the small file is what ships: int weights, no float copy of the quantized layers
        assert (out / QUANTIZED_FILE).stat().st_size < 0.5 * (tmp_path / "fp" / "model.safetensors").stat().st_size
    with pytest.raises(QuantizeError, match="scheme 'int8'.*quantize='int4'"):
        minibt.from_hub(tmp_path / "int8", quantize="int4")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (tmp_path / "int8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizeError, match="config.json.*another model"):
        minibt.from_hub(tmp_path / "int8")
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    path = tmp_path / "int4" / QUANTIZED_FILE
    with safe_open(path, framework="pt") as f:
        manifest = json.loads(f.metadata()["minibt"])
    tensors = load_file(path)
    save_file(tensors, path, metadata={"minibt": json.dumps({**manifest, "version": 99})})
    with pytest.raises(QuantizeError, match="version 99"):
        minibt.from_hub(tmp_path / "int4")
    tensors.pop("layers.0.attention.qkv.codes")
    save_file(tensors, path, metadata={"minibt": json.dumps(manifest)})
    with pytest.raises(QuantizeError, match=r"missing \(1\): layers.0.attention.qkv.packed"):
        minibt.from_hub(tmp_path / "int4")


def _tiny_llama(folder, **kw):
    import transformers
    torch.manual_seed(5)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=64, **kw)).eval().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_bf16_quantized_round_trip_and_load_arguments(tmp_path, scheme):
    """A bf16 quantized model (what the README recommends) saves and loads back bit-identically; a saved folder loads
    as saved: another dtype or head is refused by name, not silently ignored; compile= still applies."""
    fp = _tiny_llama(tmp_path / "fp", tie_word_embeddings=True)
    model = minibt.from_hub(fp, quantize=scheme, dtype=torch.bfloat16)
    back = minibt.from_hub(save_quantized(model, tmp_path / "q"))
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids, mask = left_padded(99, 0)
    assert torch.equal(model(ids, attention_mask=mask).logits, back(ids, attention_mask=mask).logits)
    assert minibt.from_hub(tmp_path / "q", dtype="bfloat16").quantization["scheme"] == scheme
    with pytest.raises(QuantizeError, match="dtype bfloat16; dtype=float32 was asked"):
        minibt.from_hub(tmp_path / "q", dtype=torch.float32)
    with pytest.raises(QuantizeError, match="head causal-lm; head=base"):
        minibt.from_hub(tmp_path / "q", head="base")
    with pytest.raises(QuantizeError, match="'int5' is not a scheme"):
        minibt.from_hub(tmp_path / "q", quantize="int5")
    with pytest.raises(QuantizeError, match="the folder this model was loaded from"):
        save_quantized(back, tmp_path / "q")                           # nothing written over the source
    with pytest.raises(QuantizeError, match="the folder this model was loaded from"):
        save_quantized(minibt.from_hub(fp, quantize=scheme), fp)
    assert not (fp / QUANTIZED_FILE).exists()


def test_saved_quantized_encoder_takes_compile(tiny, tmp_path):
    folder, _ = tiny("BertForMaskedLM", intermediate_size=64)
    out = save_quantized(minibt.from_hub(folder, quantize="int8"), tmp_path / "q")
    model = minibt.from_hub(out, compile=True)
    assert all(layer.mlp._compiled_call_impl is not None for layer in model.layers)
    assert minibt.from_hub(out).layers[0].mlp._compiled_call_impl is None


def test_fp16_model_keeps_fp16_through_quantized_linears(tmp_path):
    fp = _tiny_llama(tmp_path / "fp", attention_bias=True, mlp_bias=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                 # the fp16-on-CPU speed warning
        model = minibt.from_hub(fp, quantize="int8", dtype=torch.float16)
    ids, mask = left_padded(99, 0)
    out = model(ids, attention_mask=mask).logits
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_load_state_dict_refreshes_the_int8_kernel_scales(tmp_path):
    a = minibt.from_hub(_tiny_llama(tmp_path / "a"), quantize="int8")
    import transformers
    torch.manual_seed(6)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=64)).eval().save_pretrained(tmp_path / "b", safe_serialization=True)
    b = minibt.from_hub(tmp_path / "b", quantize="int8")
    a.load_state_dict(b.state_dict())
    ids, mask = left_padded(99, 0)
    assert torch.equal(a(ids, attention_mask=mask).logits, b(ids, attention_mask=mask).logits)


def _edit(path, change_manifest=None, change_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(path, framework="pt") as f:
        manifest = json.loads(f.metadata()["minibt"])
    tensors = load_file(path)
    if change_manifest:
        change_manifest(manifest)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, path, metadata={"minibt": json.dumps(manifest)})


TAMPER = [   # (scheme, manifest edit, tensor edit, words of the error)
    ("int8", lambda m: m.update(dtype="foo"), None, "dtype 'foo'"),
    ("int8", lambda m: m.pop("config_hash"), None, "'config_hash' is missing"),
    ("int8", lambda m: m.update(modules=None), None, "'modules' is missing"),
    ("int4", lambda m: m["group_sizes"].popitem(), None, "'group_sizes'"),
    ("int4", lambda m: m["group_sizes"].update({k: "32" for k in m["group_sizes"]}), None, "'group_sizes'"),
    ("int8", lambda m: m.update(aliases={"layers.0.mlp.down.qweight": "layers.1.mlp.down.qweight"}), None,
     "name tensors the file also holds"),
    ("int8", lambda m: m.update(aliases={"lm_head.weight": "nope"}), None, "does not hold"),
    ("int4", None, lambda t: t.update({"layers.0.mlp.down.codes": t["layers.0.mlp.down.codes"].view(torch.int8)}),
     "torch.int8"),
    ("int4", None, lambda t: t.update({"layers.0.mlp.down.codes": t["layers.0.mlp.down.codes"][None]}), "codes: checkpoint (1,"),
    ("int4", None, lambda t: t.update({"layers.0.mlp.down.packed": t.pop("layers.0.mlp.down.codes")}), "kernel layout"),
    # values save_quantized cannot write (hostile pass): a huge scale (NaN outputs), one below its floor, code -128
    ("w8a8", None, lambda t: t["layers.0.mlp.down.scale"].__setitem__(0, 3e38), "'layers.0.mlp.down.scale' holds 1"),
    ("int8", None, lambda t: t["layers.0.mlp.down.scale"].fill_(1e-44), "'layers.0.mlp.down.scale' holds"),
    ("int8", None, lambda t: t["layers.0.mlp.down.qweight"][0].fill_(-128), "the code -128"),
]


@pytest.mark.parametrize("scheme,manifest,tensors,words", TAMPER, ids=[t[3][:20] for t in TAMPER])
def test_tampered_quantized_files_are_refused_by_name(tmp_path, scheme, manifest, tensors, words):
    out = save_quantized(minibt.from_hub(_tiny_llama(tmp_path / "fp"), quantize=scheme), tmp_path / "q")
    _edit(out / QUANTIZED_FILE, manifest, tensors)
    with pytest.raises(QuantizeError, match=__import__("re").escape(words)):
        minibt.from_hub(out)


# ---------------------------------------------------------------------------------------------- real models

def stdlib_corpus(n: int, seed: int = 0) -> list[str]:
    """Real text: paragraphs of the top-level standard-library modules' docstrings (tests/real_corpus.py)."""
    return real_corpus.stdlib_corpus(n, seed, recursive=False)


@pytest.mark.slow
def test_minilm_int8_embeddings_on_a_real_corpus(minilm):
    texts = stdlib_corpus(1000)
    tok = minibt.load_tokenizer(minilm)
    fp = minibt.embed(minibt.from_hub(minilm), tok, texts)
    q = minibt.embed(minibt.from_hub(minilm, quantize="int8"), tok, texts)
    cos = F.cosine_similarity(q.float(), fp).min().item()
    assert cos >= 0.99, cos


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minilm_w8a8_embeddings_on_a_real_corpus(minilm, dtype):
    """int8 activations too: min cosine to fp32 on 1,000 real texts measured 0.9897 (fp32 model) here; the test
    holds it to >= 0.985 (README: under the 0.99 bar, so quantize="auto" does not pick it)."""
    texts = stdlib_corpus(1000)
    tok = minibt.load_tokenizer(minilm)
    fp = minibt.embed(minibt.from_hub(minilm), tok, texts)
    model = minibt.from_hub(minilm, quantize="w8a8", dtype=dtype)
    assert all(isinstance(m, W8A8Linear) for m in model.layers.modules() if isinstance(m, Int8Linear))
    q = minibt.embed(model, tok, texts)
    assert F.cosine_similarity(q.float(), fp).min().item() >= 0.985


@pytest.fixture(scope="module")
def smol(smollm2):
    tok = minibt.load_tokenizer(smollm2)
    return tok, {s: minibt.from_hub(smollm2, quantize=s) for s in (None, "int8", "int4")}


PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The three primary colors are",
           "In 1492, Christopher Columbus", "The largest planet in the solar system is",
           "A good recipe for pancakes needs", "Python is a programming language that", "The theory of relativity"]


@pytest.mark.slow
def test_smollm2_int8_greedy_agrees_with_fp32(smol):
    """fp32's greedy continuations (8 prompts x 32 new tokens); int8 must pick the same next token given the same
    prefix at >= 90% of them (measured: int8 94%, bf16 94.5%; int4 with groups of 64: 56%). Free-running
    continuations (each model feeding itself) agree far less, by near-ties cascading: bf16 alone matched fp32 at
    only 59% of positions and int8 at 42% (docs/benchmarks.md), so that is not what this asserts."""
    tok, models = smol
    batch = tok(PROMPTS, padding_side="left")
    n = batch["input_ids"].shape[1]
    seqs = models[None].generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=32)
    mask = torch.cat([batch["attention_mask"], torch.ones(len(PROMPTS), 32, dtype=torch.long)], 1)
    with torch.inference_mode():
        picks = models["int8"](seqs, attention_mask=mask).logits[:, n - 1:-1].argmax(-1)
    agree = (picks == seqs[:, n:]).float().mean().item()
    assert agree >= 0.9, agree


def perplexity(model, ids) -> float:
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].float()
    return torch.exp(F.cross_entropy(logits, ids[0, 1:])).item()


@pytest.mark.slow
def test_smollm2_perplexity(smol):
    tok, models = smol
    text = " ".join(stdlib_corpus(40, seed=1))                     # fixed real text
    ids = torch.tensor([tok.encode([text], truncation=True, max_length=512)[0].ids])
    fp = perplexity(models[None], ids)
    for scheme, limit in (("int8", 0.03), ("int4", 0.10)):
        ppl = perplexity(models[scheme], ids)
        assert abs(ppl / fp - 1) <= limit, (scheme, ppl, fp)


def test_audit_quantized_and_audit_on_a_quantized_model(tiny):
    from minibt.tools.audit import audit, audit_quantized
    folder, _ = tiny("BertForMaskedLM", intermediate_size=64)
    fp, q8, q4 = (minibt.from_hub(folder, quantize=s) for s in (None, "int8", "int4"))
    ids, mask = ragged_batch(99, 0)
    inputs = dict(input_ids=ids, attention_mask=mask)
    r8, r4 = audit_quantized(fp, q8, inputs), audit_quantized(fp, q4, inputs)
    assert len(r8.rows) == len(fp.layers) + 1 and r8.rows[-1]["layer"] == "output"
    assert all(0 < r["rel"] < 0.05 and r["cos"] > 0.99 for r in r8.rows)
    assert r4.rows[-1]["rel"] > r8.rows[-1]["rel"]                    # int4 drifts more than int8
    assert "| output |" in r8.table()
    assert audit_quantized(fp, fp, inputs).rows[-1]["abs"] == 0
    with pytest.raises(minibt.errors.InputError, match="no full-precision reference"):
        audit_quantized(q8, q8, inputs)                              # e.g. a saved quantized folder loaded twice
    res = audit(q8, inputs, ["naive", "sdpa", "varlen"])            # the backend audit still runs, fp64 reference
    assert set(res.summary) == {"naive", "sdpa", "varlen"} and all(s["max_rel"] < 5e-2 for s in res.summary.values())


def test_cli_quantize_flag(minilm):
    """--quantize on the commands: embed runs on int8 weights (vectors close to fp32), audit adds the drift table."""
    import subprocess
    import sys
    run = lambda *a: subprocess.run([sys.executable, "-m", "minibt", *a], capture_output=True, text=True, timeout=600)
    r = run("embed", "--quantize", "int8", "--vectors", "A man is eating food.")
    assert r.returncode == 0, r.stderr
    r = run("audit", "--quantize", "int8", "--backends", "sdpa,varlen", "A man is eating food.")
    assert r.returncode == 0, r.stderr
    assert "| output |" in r.stdout and "| sdpa |" in r.stdout
    r = run("audit", "--backends", "auto", "text")               # auto is audited on its layer outputs
    assert r.returncode == 0 and "| auto | layer outputs (auto ran sdpa) |" in r.stdout, r.stderr


def _reference_codes(x, sx):
    return torch.round(x.double() / sx.double())


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_kernel_equals_its_plain_form(rows, dtype):
    """The oneDNN route (uint8 codes, zero point 128, sums in int32) against the float64 textbook form on the same
    integer codes: equal up to fp32 rounding of the output, for any rows (decode and encoder batches); an outlier
    row does not change the others' codes (per-row scales)."""
    torch.manual_seed(rows)
    lin = torch.nn.Linear(96, 80)
    layer = W8A8Linear.from_weight(lin.weight, lin.bias)
    x = torch.randn(rows, 96).to(dtype)
    got, want = layer(x), layer(x.double())
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    # the plain form itself: y = round(x / sx) q^T sx s + b, with sx = max|x_row| / levels
    sx = (x.double().abs().amax(1, keepdim=True).float() / layer.levels).double()      # the scale in fp32
    by_hand = (_reference_codes(x, sx) @ layer.qweight.double().T) * sx * layer.scale.double() + lin.bias.double()
    torch.testing.assert_close(want, by_hand, atol=1e-9, rtol=1e-9)
    x2 = x.clone()
    x2[0] *= 1000                                                   # one outlier row
    torch.testing.assert_close(layer(x2)[1:], got[1:])
    # within the documented error of the float layer: half a code of x and of w per product
    err = (want - lin(x.double().float()).double()).abs().max().item()
    bound = (sx.max() * lin.weight.double().abs().sum(1).max() + x.double().abs().max() * layer.scale.max() * 96)
    assert err <= bound.item()


def test_w8a8_activation_levels_follow_the_cpu():
    from minibt.kernels import quantize as q
    assert q.activation_levels() == (127 if q.cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"} else 63)


def test_auto_picks_by_cpu_feature_and_only_for_encoders_on_the_cpu(tiny, tiny_decoder, monkeypatch):
    from minibt.kernels import quantize as q
    assert q.auto_path({"amx_bf16", "avx512_vnni"})[:2] == (torch.bfloat16, None)
    assert q.auto_path({"avx512_vnni", "avx512_bf16"})[:2] == (torch.bfloat16, None)
    assert q.auto_path({"avx2", "avx512_vnni"})[:2] == (None, None)
    folder, _ = tiny("BertForMaskedLM", intermediate_size=64)
    for flags, scheme, dtype in (({"avx512_bf16"}, None, torch.bfloat16), ({"amx_bf16"}, None, torch.bfloat16),
                                 ({"avx2"}, None, torch.float32)):
        monkeypatch.setattr(q, "cpu_flags", lambda flags=flags: set(flags))
        model = minibt.from_hub(folder, quantize="auto")
        assert (getattr(model, "quantization", None) or {}).get("scheme") == scheme
        assert next(model.parameters()).dtype == dtype
        assert next(minibt.from_hub(folder, quantize="auto", dtype=torch.float32).parameters()).dtype == torch.float32
    decoder = minibt.from_hub(tiny_decoder("llama-gqa")[0], quantize="auto")
    assert not getattr(decoder, "quantization", None)             # decoders: measured separately, left as loaded
