"""Every encoder family x head x backend against transformers on tiny random checkpoints (fp32 <= 1e-4)."""
import json

import pytest
import torch

import minibt
from minibt import attention
from minibt.errors import BackendError
from minibt.kernels.fused_encoder import FusedEncoder
from minibt.models.bert import LayerStack
from conftest import ENCODERS, encoder_config, ragged_batch

ARCHS = [arch for _, archs in ENCODERS.values() for arch in archs]
BACKENDS = ["naive", "sdpa", "varlen", "flash", "tiled", "fused"]


def refused(folder, attn):
    """A backend that cannot compute the family's attention variants (MPNet's relative bias: flash, fused) is
    refused by name, at load (fused, a model-level transform) or when the forward begins; so is fused for a family
    whose layers are not BERT's (NomicBERT's RoPE and SwiGLU). True when it was."""
    base = minibt.from_hub(folder)
    missing = set(base.variants) - attention.get(attn).variants
    if not missing and attn == "fused" and not isinstance(base.layers, LayerStack):
        with pytest.raises(BackendError, match=f"attn='fused' runs BERT's post-LN layer .* {base.family}'s layers"):
            minibt.from_hub(folder, attn=attn)
        return True
    if not missing:
        return False
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(BackendError, match=f"cannot compute {', '.join(sorted(missing))}|needs {', '.join(missing)}"):
        minibt.from_hub(folder, attn=attn)(ids)
    return True


def reference(ref, ids, mask):
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_parity_fp32(tiny, arch, attn):
    folder, ref = tiny(arch)
    if refused(folder, attn):
        return
    model = minibt.from_hub(folder, attn=attn)
    assert model.head == ENCODERS[model.family][1][arch] and model.attn == attn
    ids, mask = ragged_batch(ref.config.vocab_size, ref.config.pad_token_id)
    out = model(ids, attention_mask=mask)
    want = reference(ref, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], want.hidden_states[-1][real], atol=1e-4, rtol=0)
    assert out.last_hidden_state[~real].abs().max() == 0                  # padded positions exactly 0
    if arch.endswith("MaskedLM"):
        torch.testing.assert_close(out.logits[real], want.logits[real], atol=1e-4, rtol=0)
    elif arch.endswith("SequenceClassification"):
        rows = real.any(1)                                                # the fully padded row has no first token
        torch.testing.assert_close(out.logits[rows], want.logits[rows], atol=1e-4, rtol=0)
    else:
        assert out.logits is None
    if getattr(want, "pooler_output", None) is not None:
        torch.testing.assert_close(out.pooler_output[:3], want.pooler_output[:3], atol=1e-4, rtol=0)
    assert torch.isfinite(out.last_hidden_state).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_flex_encoder_parity_fp32(tiny, arch):
    """flex on CPU is inference only (torch has no backward for it there): under no_grad."""
    folder, ref = tiny(arch)
    model = minibt.from_hub(folder, attn="flex")
    ids, mask = ragged_batch(ref.config.vocab_size, ref.config.pad_token_id)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    real = mask.bool()
    want = reference(ref, ids, mask)
    torch.testing.assert_close(out.last_hidden_state[real], want.hidden_states[-1][real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["naive", "sdpa", "varlen", "fused"])
@pytest.mark.parametrize("arch", ["BertForMaskedLM", "RobertaModel", "DistilBertForSequenceClassification"])
def test_encoder_parity_bf16(tiny, arch, attn):
    """bf16 weights and activations: within 3e-2 of transformers in fp32 (bf16 keeps ~3 significant digits)."""
    folder, ref = tiny(arch)
    model = minibt.from_hub(folder, attn=attn, dtype=torch.bfloat16)
    assert model.embeddings.word.weight.dtype == torch.bfloat16
    ids, mask = ragged_batch(ref.config.vocab_size, ref.config.pad_token_id)
    out = model(ids, attention_mask=mask)
    want = reference(ref, ids, mask)
    real = mask.bool()
    got, exp = out.last_hidden_state[real].float(), want.hidden_states[-1][real]
    assert (got - exp).abs().max() < 3e-2 * exp.abs().max()


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_hidden_act_honoured(tiny, act):
    folder, ref = tiny("BertForMaskedLM", hidden_act=act)
    ids, mask = ragged_batch(99, 0)
    out = minibt.from_hub(folder, attn="sdpa")(ids, attention_mask=mask)
    want = reference(ref, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], want.logits[real], atol=1e-4, rtol=0)


def test_distilbert_activation_honoured(tiny):
    folder, ref = tiny("DistilBertModel", activation="relu")
    ids, mask = ragged_batch(99, 0)
    out = minibt.from_hub(folder, attn="varlen")(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], reference(ref, ids, mask).hidden_states[-1][real],
                               atol=1e-4, rtol=0)


def test_roberta_positions_skip_padding_idx(tiny):
    """RoBERTa numbers positions from padding_idx + 1; a long sequence must use the last position rows."""
    folder, ref = tiny("RobertaModel")
    model = minibt.from_hub(folder, attn="sdpa")
    assert model.max_length() == 64
    ids = torch.randint(3, 99, (1, 64))
    torch.testing.assert_close(model(ids).last_hidden_state, reference(ref, ids, None).hidden_states[-1],
                               atol=1e-4, rtol=0)


def test_token_type_ids(tiny):
    folder, ref = tiny("BertModel")
    ids, mask = ragged_batch(99, 0)
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    out = minibt.from_hub(folder, attn="varlen")(ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], want[real], atol=1e-4, rtol=0)


def test_output_attentions(tiny):
    folder, ref = tiny("BertModel")
    ids, mask = ragged_batch(99, 0)
    model = minibt.from_hub(folder, attn="naive")
    out = model(ids, attention_mask=mask, output_attentions=True)
    ref.set_attn_implementation("eager")          # transformers' sdpa cannot return probabilities
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    ref.set_attn_implementation("sdpa")
    assert len(out.attentions) == len(want) == 2
    rows = mask.bool()[:3]
    for got, exp in zip(out.attentions, want):
        assert got.shape == exp.shape
        torch.testing.assert_close(got[:3].transpose(1, 2)[rows], exp[:3].transpose(1, 2)[rows], atol=1e-5, rtol=0)
    assert out.attentions[0][3].abs().sum() == 0                          # fully padded row: zeros, not NaN
    with pytest.raises(minibt.errors.BackendError, match="naive"):
        model.set_attention("sdpa")(ids, attention_mask=mask, output_attentions=True)


def test_set_attention_switches_in_place(tiny):
    folder, _ = tiny("BertModel")
    model = minibt.from_hub(folder, attn="naive")
    ids, mask = ragged_batch(99, 0)
    a = model(ids, attention_mask=mask).last_hidden_state
    assert model.set_attention("varlen") is model and model.attn == "varlen"
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, a, atol=1e-5, rtol=0)


def test_no_mask_and_left_padding(tiny):
    """No mask at all; and a left-padded encoder batch (repacked by index for varlen/fused) equals naive."""
    folder, _ = tiny("BertModel")
    model = minibt.from_hub(folder, attn="naive")
    ids = torch.randint(3, 99, (2, 7))
    want = model(ids).last_hidden_state
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 1]])    # left padding and a holey row
    spec = model(ids, attention_mask=mask).last_hidden_state
    for attn in BACKENDS:
        model.set_attention(attn)
        torch.testing.assert_close(model(ids).last_hidden_state, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, spec, atol=1e-5, rtol=0)


def test_auto_picks_only_valid_paths(tiny):
    """auto: naive when probabilities are asked for, varlen with padding, sdpa without; never fused (even for a
    gelu_new model the fused kernel would get wrong)."""
    folder, ref = tiny("BertForMaskedLM", hidden_act="gelu_new")
    model = minibt.from_hub(folder)
    assert model.attn == "auto"
    ids, mask = ragged_batch(99, 0)
    assert attention.for_call(model.backend, mask, False).name == "varlen"
    assert attention.for_call(model.backend, torch.ones_like(mask), False).name == "sdpa" and attention.for_call(model.backend, None, False).name == "sdpa"
    assert attention.for_call(model.backend, mask, True).name == "naive"
    out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2
    want = reference(ref, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], want.logits[real], atol=1e-4, rtol=0)
    assert not isinstance(model.layers, FusedEncoder)


# ---------------------------------------------------------------------------------------------- NomicBERT

# nomic-embed-text-v1.5's config.json as the hub ships it (nomic's own names, none of transformers'), sizes shrunk;
# eps and theta other than the real 1e-12 and 1000, so that reading them (not a default) is what passes
NOMIC_HUB_CONFIG = {
    "model_type": "nomic_bert", "architectures": ["NomicBertModel"], "activation_function": "swiglu",
    "n_embd": 32, "n_head": 4, "n_layer": 2, "n_inner": 37, "n_positions": 8192, "max_trained_positions": 2048,
    "vocab_size": 99, "type_vocab_size": 2, "pad_vocab_size_multiple": 1, "layer_norm_epsilon": 1e-5,
    "rotary_emb_base": 10000, "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None, "rotary_scaling_factor": None, "prenorm": False, "parallel_block": False,
    "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "use_rms_norm": False, "causal": False,
    "torch_dtype": "float32",
}


@pytest.mark.parametrize("layout", ["nomic-only", "both"])
def test_nomic_hub_config_names(tmp_path, layout):
    """The hub checkpoints' own config.json (n_embd, rotary_emb_base, layer_norm_epsilon, ...) is read, alone or
    next to transformers' names (as v1.5's config.json now has them: n_positions 8192, max_position_embeddings
    2048; the first is the length served)."""
    import transformers
    torch.manual_seed(7)
    ref = transformers.NomicBertModel(encoder_config(
        "nomic_bert", layer_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    saved = json.loads((tmp_path / "config.json").read_text()) if layout == "both" else {}
    (tmp_path / "config.json").write_text(json.dumps({**saved, **NOMIC_HUB_CONFIG}))
    model = minibt.from_hub(tmp_path, attn="varlen")
    assert model.max_length() == 8192 and model.config.rope_theta == 10000.0
    ids, mask = ragged_batch(99, 0)
    real = mask.bool()
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state[real],
                               reference(ref, ids, mask).last_hidden_state[real], atol=1e-4, rtol=0)


def test_nomic_head_dim_and_token_types(tiny):
    """head_dim apart from hidden_size / heads (q, k, v of 4 x 16 on a 32-wide model); token type 1 on a part."""
    folder, ref = tiny("NomicBertModel", head_dim=16)
    ids, mask = ragged_batch(99, 0)
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    out = minibt.from_hub(folder, attn="sdpa")(ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["naive", "sdpa", "varlen"])
def test_nomic_parity_bf16(tiny, attn):
    """bf16, as test_encoder_parity_bf16: within 3e-2 of transformers in fp32, relative to the largest value."""
    folder, ref = tiny("NomicBertForMaskedLM")
    model = minibt.from_hub(folder, attn=attn, dtype=torch.bfloat16)
    assert model.embeddings.word.weight.dtype == torch.bfloat16
    ids, mask = ragged_batch(99, 0)
    out, want = model(ids, attention_mask=mask), reference(ref, ids, mask)
    real = mask.bool()
    got, exp = out.last_hidden_state[real].float(), want.hidden_states[-1][real]
    assert (got - exp).abs().max() < 3e-2 * exp.abs().max()
    got, exp = out.logits[real].float(), want.logits[real]
    assert (got - exp).abs().max() < 3e-2 * exp.abs().max()
