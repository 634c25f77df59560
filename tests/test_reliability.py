"""Hostile checkpoints, configs, tokenizer files, inputs, generation arguments, user backends and threads: each ends
in a MinibtError subclass whose message names the fault, or in a correct answer (docs/reliability.md)."""
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import minibt
from minibt import attention
from minibt.errors import BackendError, CheckpointError, ConfigError, InputError
from conftest import left_padded, ragged_batch
from test_loading import copy, edit_config, rewrite_keys


@pytest.fixture(scope="module")
def bert_folder(tiny):
    return tiny("BertModel")[0]


@pytest.fixture(scope="module")
def bert(bert_folder):
    return minibt.from_hub(bert_folder)


def shard(folder, names_of_keys: dict, index_map=None):
    """Rewrite folder's model.safetensors as shards {file: [keys]} plus an index (index_map overrides its map)."""
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    weight_map = {}
    for name, keys in names_of_keys.items():
        save_file({k: sd[k] for k in keys}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index_map or weight_map}))
    return sd


# ------------------------------------------------------------------------------------------------ loader security

def test_index_naming_a_shard_outside_the_folder_is_refused(bert_folder, tmp_path):
    folder = copy(bert_folder, tmp_path)
    sd = load_file(folder / "model.safetensors")
    keys = sorted(sd)
    outside = tmp_path / "outside.safetensors"
    save_file({k: sd[k] for k in keys[1:]}, outside, metadata={"format": "pt"})
    shard(folder, {"model-1.safetensors": keys[:1]},
          index_map={**{k: "model-1.safetensors" for k in keys[:1]}, **{k: "../outside.safetensors" for k in keys[1:]}})
    with pytest.raises(CheckpointError, match=r"'\.\./outside\.safetensors' is not a plain path inside the model"):
        minibt.from_hub(folder)


def test_a_link_leaving_the_folder_is_refused(bert_folder, tmp_path):
    folder = copy(bert_folder, tmp_path)
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="outside the model folder"):
        minibt.from_hub(folder)


def test_a_tensor_in_two_shards_is_refused(bert_folder, tmp_path):
    folder = copy(bert_folder, tmp_path)
    keys = sorted(load_file(folder / "model.safetensors"))
    shard(folder, {"model-1.safetensors": keys[:5], "model-2.safetensors": keys[4:]})
    with pytest.raises(CheckpointError, match=rf"tensor '{keys[4]}' is in two shards, model-1.safetensors and "
                                              r"model-2.safetensors"):
        minibt.from_hub(folder)


def test_unexpected_fused_part_is_reported_not_crashed(bert_folder, tmp_path):
    """A lone q/k/v part of a layer the model does not have used to crash the report's sort (None vs str)."""
    folder = copy(bert_folder, tmp_path)
    rewrite_keys(folder, lambda sd: {**sd, "encoder.layer.7.attention.self.query.weight": torch.zeros(32, 32)})
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): encoder\.layer\.7\.attention\.self\.query\.weight"):
        minibt.from_hub(folder)


def test_huge_unexpected_report_is_summarised(bert_folder, tmp_path):
    folder = copy(bert_folder, tmp_path)
    rewrite_keys(folder, lambda sd: {**sd, **{f"junk.{i}": torch.zeros(1) for i in range(5000)}})
    with pytest.raises(CheckpointError) as e:
        minibt.from_hub(folder)
    assert "unexpected (5000)" in str(e.value) and "and 4970 more" in str(e.value) and len(str(e.value)) < 4000


@pytest.mark.parametrize("damage, fault", [
    (lambda b: b[:4], "shorter than its 8-byte header length"),
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "exceeds the file"),
    (lambda b: b[:8] + b"[" + b[9:], "its header: not valid JSON"),
    (lambda b: b[:8] + b[8:].replace(b'"F32"', b'"Q99"', 1), "has dtype Q99"),
    (lambda b: b[:8] + b[8:].replace(b'"shape":[32', b'"shape":[33', 1), "bytes for shape"),
    (lambda b: b[:len(b) - 64], "past the end of the file"),
])
def test_corrupt_headers_name_the_fault(bert_folder, tmp_path, damage, fault):
    folder = copy(bert_folder, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=fault) as e:
        minibt.from_hub(folder)
    assert str(path) in str(e.value)


def test_live_model_survives_its_file_being_rewritten_or_truncated(bert_folder, tmp_path, bert):
    """The model owns its weights: rewriting or truncating the checkpoint after loading changes nothing and cannot
    kill the process (SIGBUS) the way a memory map of it could."""
    folder = copy(bert_folder, tmp_path)
    model = minibt.from_hub(folder)
    ids, mask = ragged_batch(99, 0)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state.clone()
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4096:] = bytes(4096)                            # in place: same inode, same size, other bytes
    with open(path, "r+b") as f:
        f.write(data)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, before)
    with open(path, "r+b") as f:
        f.truncate(100)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, before)


# ------------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("changes, fault", [
    (dict(hidden_size="32"), "'hidden_size' = '32' must be an integer"),
    (dict(num_attention_heads=-4), "'num_attention_heads' = -4 is out of range"),
    (dict(num_attention_heads=5), "hidden_size = 32 is not divisible by num_attention_heads = 5"),
    (dict(layer_norm_eps="tiny"), "'layer_norm_eps' = 'tiny' must be a finite number"),
    (dict(vocab_size=None), "required field 'vocab_size' is missing"),
    (dict(tie_word_embeddings="yes"), "'tie_word_embeddings' = 'yes' must be true or false"),
])
def test_bad_config_fields_are_named(bert_folder, tmp_path, changes, fault):
    folder = copy(bert_folder, tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=fault) as e:
        minibt.from_hub(folder)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors.index.json"])
def test_json_files_that_are_not_objects(bert_folder, tiny_decoder, tmp_path, name):
    if name == "generation_config.json":                 # read by decoders only: an encoder loads whatever it holds
        encoder = copy(bert_folder, tmp_path, "encoder")
        (encoder / name).write_text("[1, 2, 3]")
        minibt.from_hub(encoder)
    folder = copy(bert_folder if name != "generation_config.json" else tiny_decoder("llama-gqa")[0], tmp_path)
    if name == "model.safetensors.index.json":
        shard(folder, {"model-1.safetensors": sorted(load_file(folder / "model.safetensors"))})
    (folder / name).write_text("[1, 2, 3]")
    error = CheckpointError if name.endswith("index.json") else ConfigError
    with pytest.raises(error, match=name.replace(".", r"\.") + ": must hold a JSON object, got list"):
        minibt.from_hub(folder)


def test_sentence_transformers_files_are_checked(minilm, tmp_path):
    folder = copy(minilm, tmp_path)
    model, tok = minibt.from_hub(folder), minibt.load_tokenizer(folder)
    (folder / "modules.json").write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match=r"modules\.json: must hold a JSON list"):
        minibt.embed(model, tok, ["x"])
    (folder / "modules.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"modules\.json: the first module must be a Transformer"):
        minibt.embed(model, tok, ["x"])
    (folder / "modules.json").write_text('[{"path": "", "type": "sentence_transformers.models.Transformer"}]')
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": "long"}')
    with pytest.raises(ConfigError, match="'max_seq_length' = 'long' must be an integer"):
        minibt.embed(model, tok, ["x"])


def test_rope_scaling_and_roberta_pad_fields(tiny_decoder, tiny, tmp_path):
    folder = copy(tiny_decoder("llama-gqa")[0], tmp_path, "llama")
    edit_config(folder, rope_parameters=None, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ConfigError, match="rope_scaling: required field 'low_freq_factor' is missing"):
        minibt.from_hub(folder)
    edit_config(folder, rope_scaling={"rope_type": "linear", "factor": "2"})
    with pytest.raises(ConfigError, match="'factor' = '2' must be a finite number"):
        minibt.from_hub(folder)
    roberta = copy(tiny("RobertaModel")[0], tmp_path, "roberta")
    cfg = json.loads((roberta / "config.json").read_text())
    cfg["pad_token_id"] = None
    (roberta / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="pad_token_id is null"):
        minibt.from_hub(roberta)


def test_corrupt_tokenizer_json(minilm, tmp_path):
    folder = copy(minilm, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ConfigError, match=r"tokenizer\.json: not a tokenizer file"):
        minibt.load_tokenizer(folder)


# ------------------------------------------------------------------------------------------------ inputs

def test_bad_inputs_are_named(bert):
    ids, mask = ragged_batch(99, 0)
    cases = [
        (dict(input_ids=ids.float()), "must hold integer token ids"),
        (dict(input_ids=ids, attention_mask=mask * 2), "attention_mask values must be 0 or 1"),
        (dict(input_ids=ids, attention_mask=(1.0 - mask.float()) * -10000.0), "an additive mask"),
        (dict(input_ids=ids, token_type_ids=torch.full_like(ids, 2)), r"token_type_ids must be in \[0, 2\)"),
        (dict(input_ids=ids, token_type_ids=ids[:1]), "token_type_ids shape"),
        (dict(input_ids=ids.tolist()), "must be a torch.Tensor"),
    ]
    for kwargs, fault in cases:
        with pytest.raises(InputError, match=fault):
            bert(**kwargs)
    bool_mask = bert(ids, attention_mask=mask.bool()).last_hidden_state         # bool masks are fine
    torch.testing.assert_close(bool_mask, bert(ids, attention_mask=mask).last_hidden_state)


def test_embed_takes_one_string_as_one_text_and_pools_empty_text_finitely(minilm):
    model, tok = minibt.from_hub(minilm), minibt.load_tokenizer(minilm)
    one = minibt.embed(model, tok, "a single sentence")
    assert one.shape == (1, 384)
    torch.testing.assert_close(one, minibt.embed(model, tok, ["a single sentence"]))
    with pytest.raises(InputError, match=r"texts\[1\] is a int"):
        minibt.embed(model, tok, ["ok", 3])
    with pytest.raises(InputError, match="batch_size=0"):
        minibt.embed(model, tok, ["ok"], batch_size=0)
    from minibt.embedding import POOLING_MODES, Pooling
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    for how in POOLING_MODES:
        assert torch.isfinite(Pooling((how,))(hidden, mask, torch.zeros(2))).all(), how
    for how in ("max", "mean", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"):
        assert torch.equal(Pooling((how,))(hidden, mask, torch.zeros(2))[1], torch.zeros(4)), how


# ------------------------------------------------------------------------------------------------ generation

def test_generation_arguments_are_checked(tiny_decoder):
    model = minibt.from_hub(tiny_decoder("llama-gqa")[0])
    ids, mask = left_padded(99, 0)
    cases = [(dict(max_new_tokens=-1), "max_new_tokens=-1"), (dict(top_p=1.5, do_sample=True), r"top_p=1.5: must be in \(0, 1\]"),
             (dict(top_p=0.0, do_sample=True), "top_p=0.0"), (dict(top_k=0, do_sample=True), "top_k=0"),
             (dict(temperature=0.0, do_sample=True), "temperature=0.0"), (dict(seed=-3), "seed=-3")]
    for kwargs, fault in cases:
        with pytest.raises(InputError, match=fault):
            model.generate(ids, attention_mask=mask, **kwargs)


def test_right_padded_prompts_are_repacked_to_the_left(tiny_decoder):
    """A right-padded batch gives each row exactly what its left-padded twin gives (never a continuation of pad)."""
    model = minibt.from_hub(tiny_decoder("llama-gqa")[0])
    ids, left_mask = left_padded(99, 0)
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(left_mask)
    for row in range(ids.shape[0]):
        real = ids[row][left_mask[row].bool()]
        right_ids[row, :real.numel()], right_mask[row, :real.numel()] = real, 1
    want = model.generate(ids, attention_mask=left_mask, max_new_tokens=5)
    got = model.generate(right_ids, attention_mask=right_mask, max_new_tokens=5)
    assert torch.equal(got[:, -5:], want[:, -5:])


# ------------------------------------------------------------------------------------------------ user backends

def test_user_backends_are_checked_at_their_first_call(bert):
    ids, mask = ragged_batch(99, 0)

    def wrong_shape(q, k, v, *, mask, scale):
        return attention.naive(q, k, v, mask=mask, scale=scale)[:, :, :1]

    def transposed(q, k, v, *, mask, scale):       # (B, Sq, Hq, D) data returned as (B, Hq, Sq, D): same size
        out = attention.naive(q, k, v, mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(out.shape)
    for name, fn, fault in (("wrong-shape", wrong_shape, "must return q's shape"),
                            ("transposed", transposed, "differs from the naive spec")):
        attention.register(name, fn)
        try:
            with pytest.raises(BackendError, match=fault):
                bert.set_attention(name)(ids, attention_mask=mask)
        finally:
            attention._REGISTRY.pop(name)
            bert.set_attention("auto")
    with pytest.raises(BackendError, match="'naive' is a built-in backend and cannot be replaced"):
        attention.register("naive", wrong_shape)
    assert attention.get("naive").fn is attention.naive


# ------------------------------------------------------------------------------------------------ threads

def test_loading_does_not_touch_other_threads_init(bert_folder):
    """While one thread builds a model without init, modules built in another thread are initialised."""
    stop, bad = threading.Event(), []

    def build_plain_modules():
        while not stop.is_set():
            w = torch.nn.Linear(64, 64).weight.detach()
            if bool((w == 0).all()) or not bool(torch.isfinite(w).all()) or float(w.std()) == 0:
                bad.append(w)
    t = threading.Thread(target=build_plain_modules)
    t.start()
    try:
        loaders = [threading.Thread(target=minibt.from_hub, args=(bert_folder,)) for _ in range(4)]
        for th in loaders:
            th.start()
        for th in loaders:
            th.join()
    finally:
        stop.set()
        t.join()
    assert not bad
    torch.manual_seed(0)
    assert float(torch.nn.Linear(64, 64).weight.detach().std()) > 0.01    # and nothing outlived the loads


def test_one_model_and_tokenizer_from_many_threads(minilm):
    model, tok = minibt.from_hub(minilm), minibt.load_tokenizer(minilm)
    long_text = "word " * 400
    texts = [f"sentence number {i} about something" for i in range(24)] + [long_text]
    want = minibt.embed(model, tok, texts)
    want_plain = len(tok.encode([long_text])[0].ids)
    results, errors = {}, []

    def work(i):
        try:
            if i % 2:
                results[i] = minibt.embed(model, tok, texts)          # truncates to max_seq_length
            else:
                results[i] = len(tok.encode([long_text])[0].ids)      # plain encode: never truncated
        except Exception as e:      # noqa: BLE001 - the assertion below reports it
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for i, r in results.items():
        if i % 2:
            torch.testing.assert_close(r, want, atol=1e-5, rtol=0)
        else:
            assert r == want_plain > 256
