"""The loader: sharded files, both config dtype layouts, legacy names, prefixes, tying, the strict report."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minibt
from minibt.errors import CheckpointError, ConfigError
from conftest import encoder_config, ragged_batch


def copy(folder, tmp_path, name="ckpt"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def rewrite_keys(folder, fn):
    """Rewrite model.safetensors through fn(dict) -> dict."""
    path = folder / "model.safetensors"
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})


def assert_same_as_ref(model, ref, atol=1e-4):
    ids, mask = ragged_batch(99, 0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    real = mask.bool()
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state[real], want[real], atol=atol, rtol=0)


def test_sharded_checkpoint(tiny, tmp_path):
    _, ref = tiny("BertModel")
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_same_as_ref(minibt.from_hub(tmp_path, attn="sdpa"), ref)


@pytest.mark.parametrize("layout", ["dtype", "torch_dtype", None])
def test_config_dtype_layouts(tiny, tmp_path, layout):
    folder = copy(tiny("BertModel")[0], tmp_path)
    edit_config(folder, **({"dtype": None, "torch_dtype": None} | ({layout: "bfloat16"} if layout else {})))
    model = minibt.from_hub(folder)
    want = torch.bfloat16 if layout else torch.float32
    assert all(p.dtype == want for p in model.parameters())
    assert minibt.from_hub(folder, dtype=torch.float32).embeddings.word.weight.dtype == torch.float32


def test_fp16_on_cpu_warns_about_bf16(tiny):
    with pytest.warns(UserWarning, match="bfloat16"):
        minibt.from_hub(tiny("BertModel")[0], dtype=torch.float16)


def test_legacy_gamma_beta_and_pretraining_checkpoint(tmp_path):
    """bert-base-uncased's layout: BertForPreTraining keys, LayerNorm.gamma/beta, a stored (tied) decoder."""
    import transformers
    torch.manual_seed(0)
    ref = transformers.BertForPreTraining(encoder_config("bert")).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    rewrite_keys(tmp_path, lambda sd: {k.replace("LayerNorm.weight", "LayerNorm.gamma")
                                       .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in sd.items()}
                 | {"cls.predictions.decoder.weight": sd["bert.embeddings.word_embeddings.weight"].clone()})
    assert any(".gamma" in k for k in load_file(tmp_path / "model.safetensors"))
    model = minibt.from_hub(tmp_path, attn="sdpa")
    assert model.head == "masked-lm" and model.pooler is not None
    ids, mask = ragged_batch(99, 0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask)
    out = model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], want.prediction_logits[real], atol=1e-4, rtol=0)


def test_prefix_present_or_absent(tiny, tmp_path):
    folder, ref = tiny("BertModel")
    prefixed = copy(folder, tmp_path)
    rewrite_keys(prefixed, lambda sd: {f"bert.{k}": v for k, v in sd.items()})
    assert_same_as_ref(minibt.from_hub(prefixed), ref)
    # and a head checkpoint (prefixed) loaded as a bare model: head keys are ignored on purpose
    mlm_folder, mlm_ref = tiny("BertForMaskedLM")
    base = minibt.from_hub(mlm_folder, head="base")
    assert base.mlm is None and base.head == "base"
    assert_same_as_ref(base, mlm_ref.bert)


def test_tied_decoder_is_tied_not_copied(tiny):
    for arch in ("BertForMaskedLM", "RobertaForMaskedLM", "DistilBertForMaskedLM"):
        model = minibt.from_hub(tiny(arch)[0])
        assert model.mlm.decoder.weight is model.embeddings.word.weight
        assert model.mlm.decoder.weight.data_ptr() == model.embeddings.word.weight.data_ptr()


def test_no_parameter_left_on_meta_or_random(tiny):
    folder, ref = tiny("RobertaForSequenceClassification")
    model = minibt.from_hub(folder)
    ref_sd = ref.state_dict()
    for name, p in model.named_parameters():
        assert not p.is_meta, name
    torch.testing.assert_close(model.layers[1].attention.qkv.weight[:32], ref_sd["roberta.encoder.layer.1.attention.self.query.weight"])
    torch.testing.assert_close(model.classifier.out.weight, ref_sd["classifier.out_proj.weight"])


def test_strict_report_lists_every_problem(tiny, tmp_path):
    folder = copy(tiny("BertModel")[0], tmp_path)

    def damage(sd):
        del sd["encoder.layer.1.output.dense.bias"]
        sd["encoder.layer.0.mystery.weight"] = torch.zeros(2)
        sd["pooler.dense.weight"] = torch.zeros(3, 32)
        sd["encoder.layer.0.attention.self.key.bias"] = torch.zeros(5)
        return sd
    rewrite_keys(folder, damage)
    with pytest.raises(CheckpointError) as e:
        minibt.from_hub(folder)
    msg = str(e.value)
    assert str(folder) in msg
    assert "missing (1): layers.1.mlp.down.bias" in msg
    assert "unexpected (1): encoder.layer.0.mystery.weight" in msg
    assert "pooler.dense.weight: checkpoint (3, 32), model (32, 32)" in msg
    assert "encoder.layer.0.attention.self.key.bias" in msg and "(69,)" in msg     # fused q/k/v: 32 + 5 + 32


def test_head_requested_but_absent(tiny):
    with pytest.raises(CheckpointError, match="missing .*mlm.dense.weight"):
        minibt.from_hub(tiny("BertModel")[0], head="masked-lm")
    with pytest.raises(ConfigError, match="causal-lm"):
        minibt.from_hub(tiny("BertModel")[0], head="causal-lm")


def test_pickle_checkpoints_refused_never_unpickled(tiny, tmp_path):
    import pickle
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny("BertModel")[0] / "config.json", folder)
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles.*safe_serialization=True"):
        minibt.from_hub(folder)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tiny, tmp_path, damage):
    folder = copy(tiny("BertModel")[0], tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x08\x00\x00\x00\x00\x00\x00\x00notjson!")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        minibt.from_hub(folder)


def test_sharded_index_naming_a_missing_shard(tiny, tmp_path):
    _, ref = tiny("BertModel")
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        minibt.from_hub(tmp_path)


def test_config_errors(tiny, tmp_path):
    folder = copy(tiny("BertModel")[0], tmp_path)
    edit_config(folder, position_embedding_type="relative_key")
    with pytest.raises(ConfigError, match="'position_embedding_type' = 'relative_key'"):
        minibt.from_hub(folder)
    edit_config(folder, position_embedding_type="absolute", model_type="gpt9")
    with pytest.raises(ConfigError, match="model_type='gpt9'"):
        minibt.from_hub(folder)
    edit_config(folder, model_type="bert", hidden_act="quick_gelu")
    with pytest.raises(ConfigError, match="'hidden_act' = 'quick_gelu'"):
        minibt.from_hub(folder)
    with pytest.raises(CheckpointError, match="no such folder"):
        minibt.from_hub(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("changes, match", [
    ({"num_experts": 8, "moe_every_n_layers": 2}, "'num_experts' = 8 is not supported"),   # nomic-embed-text-v2-moe
    ({"rotary_emb_fraction": 0.5}, "'rotary_emb_fraction' = 0.5 is not supported"),       # partial rotary
    ({"rotary_emb_interleaved": True}, "'rotary_emb_interleaved' = True is not supported"),
    ({"rotary_scaling_factor": 2}, "'rotary_scaling_factor' = 2 is not supported"),      # nomic's dynamic NTK
    ({"prenorm": True}, "'prenorm' = True is not supported"),
    ({"qkv_proj_bias": True}, "'qkv_proj_bias' = True is not supported"),
    ({"mlp_fc1_bias": True}, "'mlp_fc1_bias' = True is not supported"),
    ({"use_rms_norm": True}, "'use_rms_norm' = True is not supported"),
    ({"scale_attn_weights": False}, "'scale_attn_weights' = False is not supported"),
    ({"activation_function": "swiglu", "hidden_act": "gelu"}, "'activation_function' = 'swiglu' disagrees with"),
    ({"hidden_act": None, "activation_function": "gelu"}, "'activation_function' = 'gelu' is not supported"),
    ({"hidden_act": "quick_gelu"}, "'hidden_act' = 'quick_gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters: field 'rope_type' = 'linear'"),
    ({"n_embd": 64}, "'n_embd' = 64 disagrees with hidden_size = 32"),
    ({"rotary_emb_base": 10000}, "'rotary_emb_base' = 10000 disagrees with the rope theta 1000.0"),
    ({"num_attention_heads": None, "n_head": "four"}, "'n_head' = 'four' must be an integer"),
    ({"hidden_size": None}, "required field 'hidden_size' is missing"),
    ({"head_dim": 7, "num_attention_heads": 4}, "'head_dim' = 7 must be even"),
])
def test_nomic_config_refusals(tiny, tmp_path, changes, match):
    """What transformers' NomicBERT does not compute, or a bad value, is a ConfigError naming the field."""
    folder = copy(tiny("NomicBertModel")[0], tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=match):
        minibt.from_hub(folder)
