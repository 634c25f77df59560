"""OPT and Llama against transformers: logits on left-padded batches for every backend, greedy generation token for
token, the KV cache against full recomputation, sampling with a seed."""
import json
import shutil

import pytest
import torch

import minibt
from minibt.errors import BackendError, ConfigError, InputError
from conftest import DECODERS, left_padded

NAMES = list(DECODERS)
BACKENDS = ["naive", "sdpa", "flash", "varlen", "tiled", "auto"]


def hf_positions(mask):
    """What transformers' generate passes for left-padded prompts (its forward alone would use arange)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def pad_id(ref):
    return ref.config.pad_token_id if ref.config.pad_token_id is not None else 0


def refused(model, attn) -> set:
    """The attention variants of this model's layers that backend `attn` does not compute (auto routes instead)."""
    entry = minibt.attention.get(attn)
    if entry.route is not None:
        return set()
    return set(model.variants) - entry.variants


def assert_refused_by_name(model, attn, run):
    """A backend that cannot compute the family's variants is refused with a BackendError naming them."""
    missing = refused(model, attn)
    with pytest.raises(BackendError, match=f"{attn!r} cannot compute {', '.join(sorted(missing))}"):
        run()


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_parity_left_padded(tiny_decoder, name, attn):
    folder, ref = tiny_decoder(name)
    model = minibt.from_hub(folder, attn=attn)
    assert model.head == "causal-lm"
    ids, mask = left_padded(99, pad_id(ref))
    if refused(model, attn):
        return assert_refused_by_name(model, attn, lambda: model(ids, attention_mask=mask))
    out = model(ids, attention_mask=mask)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], want[real], atol=1e-4, rtol=0)
    assert out.logits[~real].abs().max() == 0 and out.last_hidden_state[~real].abs().max() == 0


@pytest.mark.parametrize("name", NAMES)
def test_flex_logits_parity_left_padded(tiny_decoder, name):
    """flex on CPU is inference only (torch has no backward for it there): the same check under no_grad."""
    folder, ref = tiny_decoder(name)
    model = minibt.from_hub(folder, attn="flex")
    ids, mask = left_padded(99, pad_id(ref))
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        want = ref(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], want[real], atol=1e-4, rtol=0)
    assert out.logits[~real].abs().max() == 0


@pytest.mark.parametrize("attn", ["sdpa", "varlen", "naive", "tiled", "flex"])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_equals_transformers(tiny_decoder, name, attn):
    folder, ref = tiny_decoder(name)
    model = minibt.from_hub(folder, attn=attn)
    ids, mask = left_padded(99, pad_id(ref))
    if refused(model, attn):
        return assert_refused_by_name(model, attn, lambda: model.generate(ids, attention_mask=mask))
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad_id(ref))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=pad_id(ref))
    assert torch.equal(got, want)


def test_rows_stop_at_eos_like_transformers(tiny_decoder):
    folder, ref = tiny_decoder("llama-gqa")
    model = minibt.from_hub(folder)
    ids, mask = left_padded(99, 0)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    eos = int(free[0, ids.shape[1] + 2])                    # row 0 emits this token at its third step
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    row = got[0, ids.shape[1]:].tolist()
    assert row[2] == eos and all(t == 0 for t in row[3:])


@pytest.mark.parametrize("name", ["opt-post-ln-projected", "llama3-mqa-tied-bias-headdim", "mistral-window",
                                  "qwen2-window-layers", "gemma2", "gpt-oss", "bloom-alibi"])
def test_kv_cache_logits_equal_full_recomputation(tiny_decoder, name):
    from minibt.attention import KVCache
    folder, _ = tiny_decoder(name)
    model = minibt.from_hub(folder, attn="naive")
    ids, mask = left_padded(99, 1)
    extra = torch.randint(3, 99, (3, 4))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    full = model(full_ids, attention_mask=full_mask).logits
    for attn in ("varlen", "sdpa", "naive", "tiled"):       # varlen: a packed prefill written into the cache
        if refused(model, attn):                            # Gemma 2's softcap: sdpa and varlen are refused
            continue
        model.set_attention(attn)
        cache = KVCache.for_model(model, 3, full_ids.shape[1])
        step = [model(ids, attention_mask=mask, past_key_values=cache).logits]
        for i in range(extra.shape[1]):
            n = ids.shape[1] + i + 1
            step.append(model(extra[:, i:i + 1], attention_mask=full_mask[:, :n], past_key_values=cache).logits)
        torch.testing.assert_close(torch.cat(step, 1)[full_mask.bool()], full[full_mask.bool()], atol=1e-5, rtol=0)


def test_sampling_reproducible_with_seed(tiny_decoder):
    folder, _ = tiny_decoder("llama-gqa")
    model = minibt.from_hub(folder)
    ids, mask = left_padded(99, 0)
    kw = dict(attention_mask=mask, max_new_tokens=15, do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    a, b = model.generate(ids, seed=7, **kw), model.generate(ids, seed=7, **kw)
    c = model.generate(ids, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=15)
    assert torch.equal(model.generate(ids, seed=1, **{**kw, "top_k": 1}), greedy)   # top-1 sampling is greedy


def test_streamer_sees_every_step(tiny_decoder):
    folder, _ = tiny_decoder("opt-pre-ln")
    model = minibt.from_hub(folder)
    ids, mask = left_padded(99, 1)
    seen = []
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, ids.shape[1]:])


def test_generation_limit_is_a_clear_error(tiny_decoder):
    folder, _ = tiny_decoder("opt-pre-ln")
    model = minibt.from_hub(folder)
    with pytest.raises(InputError, match=r"60 tokens\) \+ max_new_tokens \(10\) = 70 exceeds the model's 64 positions"):
        model.generate(torch.ones(1, 60, dtype=torch.long) * 5, max_new_tokens=10)


def test_fused_refuses_decoders(tiny_decoder):
    with pytest.raises(BackendError, match="encoders"):
        minibt.from_hub(tiny_decoder("llama-gqa")[0], attn="fused")


def test_dynamic_rope_beyond_trained_length(tiny_decoder):
    """Dynamic NTK scaling only changes anything past max_position_embeddings (32 here)."""
    folder, ref = tiny_decoder("llama-dynamic-rope")
    model = minibt.from_hub(folder, attn="sdpa")
    assert model.max_length() == 64
    ids = torch.randint(3, 99, (1, 50))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=0)


def test_classic_and_new_rope_config_layouts(tiny_decoder, tmp_path):
    folder, ref = tiny_decoder("llama3-mqa-tied-bias-headdim")
    classic = tmp_path / "classic"
    shutil.copytree(folder, classic)
    cfg = json.loads((classic / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    cfg["rope_scaling"] = {**params, "type": kind}                         # the oldest spelling: "type"
    (classic / "config.json").write_text(json.dumps(cfg))
    ids, mask = left_padded(99, 0)
    a = minibt.from_hub(folder)(ids, attention_mask=mask).logits
    b = minibt.from_hub(classic)(ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    cfg["rope_scaling"]["type"] = "longrope"                            # Phi-3's kind: not implemented
    (classic / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'longrope'"):
        minibt.from_hub(classic)


def test_tied_and_untied_heads(tiny_decoder, tmp_path):
    tied = minibt.from_hub(tiny_decoder("llama3-mqa-tied-bias-headdim")[0])
    assert tied.lm_head.weight is tied.embed.weight
    untied = minibt.from_hub(tiny_decoder("llama-gqa")[0])
    assert untied.lm_head.weight is not untied.embed.weight
    opt = minibt.from_hub(tiny_decoder("opt-post-ln-projected")[0])
    assert opt.lm_head.weight is opt.embed.weight


@pytest.mark.parametrize("name", ["llama3-mqa-tied-bias-headdim", "opt-pre-ln", "bloom-alibi", "qwen3", "gemma2"])
def test_tie_config_with_a_stored_different_head_uses_the_stored_head(tiny_decoder, tmp_path, name):
    """config.json ties, but the checkpoint also stores its own lm_head.weight (not the embedding): transformers uses
    the stored head (and warns); so does minibt, naming the key. A stored head equal to the embedding stays tied."""
    import transformers
    from safetensors.torch import load_file, save_file
    folder, ref = tiny_decoder(name)
    assert ref.config.tie_word_embeddings
    path = shutil.copytree(folder, tmp_path / "untied") / "model.safetensors"
    sd = load_file(path)
    assert "lm_head.weight" not in sd
    embed = next(k for k in sd if k.endswith(("embed_tokens.weight", "word_embeddings.weight")))
    torch.manual_seed(7)
    save_file({**sd, "lm_head.weight": torch.randn_like(sd[embed])}, path, metadata={"format": "pt"})
    hf = getattr(transformers, DECODERS[name][0]).from_pretrained(path.parent).eval()
    assert not torch.equal(hf.lm_head.weight, hf.get_input_embeddings().weight)      # the oracle: not tied
    with pytest.warns(UserWarning, match="lm_head.weight with values different from"):
        model = minibt.from_hub(path.parent, dtype=torch.float32)
    assert model.lm_head.weight is not model.embed.weight
    ids, mask = left_padded(99, pad_id(ref))
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4
    save_file({**sd, "lm_head.weight": sd[embed].clone()}, path, metadata={"format": "pt"})
    same = minibt.from_hub(path.parent, dtype=torch.float32)
    assert same.lm_head.weight is same.embed.weight


def test_sharded_llama_and_bare_opt_keys(tiny_decoder, tmp_path):
    from safetensors.torch import load_file, save_file
    _, ref = tiny_decoder("llama-gqa")
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids, mask = left_padded(99, 0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = minibt.from_hub(tmp_path / "sharded")(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)
    # OPT keys without the `model.` prefix (as OPTModel saves them), loaded as a bare decoder
    folder, opt_ref = tiny_decoder("opt-pre-ln")
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    sd = load_file(bare / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in sd.items()}, bare / "model.safetensors", metadata={"format": "pt"})
    base = minibt.from_hub(bare, head="base")
    with torch.no_grad():
        want = opt_ref.model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).last_hidden_state
    torch.testing.assert_close(base(ids, attention_mask=mask).last_hidden_state[mask.bool()], want[mask.bool()],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ["naive", "sdpa", "varlen"])
def test_decoder_bf16(tiny_decoder, attn):
    folder, ref = tiny_decoder("llama-gqa")
    model = minibt.from_hub(folder, attn=attn, dtype=torch.bfloat16)
    ids, mask = left_padded(99, 0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = model(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 3e-2 * want[real].abs().max()


@pytest.mark.parametrize("attn", ["naive", "sdpa", "flash", "varlen", "tiled", "auto"])
def test_a_full_kv_cache_is_a_typed_error_on_every_backend(tiny_decoder, attn):
    """The cache checks its capacity on every write: a packed prefill (varlen) as well as a padded one, and a
    decode step past the end; the cache keeps what it had."""
    from minibt.attention import KVCache
    model = minibt.from_hub(tiny_decoder("llama-gqa")[0], attn=attn)
    ids, mask = left_padded(99, 0)
    with pytest.raises(InputError, match=r"KV cache holds 8 positions; this step needs 9"):
        model(ids, attention_mask=mask, past_key_values=KVCache.for_model(model, 3, ids.shape[1] - 1))
    cache = KVCache.for_model(model, 3, ids.shape[1])
    model(ids, attention_mask=mask, past_key_values=cache)
    assert cache.length == ids.shape[1]
    with pytest.raises(InputError, match=r"KV cache holds 9 positions; this step needs 10"):
        model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache)
    assert cache.length == ids.shape[1]


def test_windowed_layers_keep_a_rolling_cache_of_their_window(tiny_decoder):
    """Qwen2 here: layer 0 full, layers 1-2 a window of 3 keys. Those keep 3 slots whatever the length, and the
    logits of steps far past the window equal a full recomputation (transformers' forward on the whole sequence)."""
    from minibt.attention import KVCache
    folder, ref = tiny_decoder("qwen2-window-layers")
    model = minibt.from_hub(folder)
    ids, mask = left_padded(99, 0)
    cache = KVCache.for_model(model, 3, 40)
    assert [k.shape[2] for k in cache.k] == [40, 3, 3]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    full_mask = torch.cat([mask, torch.ones(3, 20, dtype=torch.long)], 1)
    with torch.no_grad():
        want = ref(input_ids=out[:, :-1], attention_mask=full_mask[:, :-1],
                   position_ids=hf_positions(full_mask[:, :-1])).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, -1], want)


def test_gpt_oss_experts_and_quantization(tiny_decoder):
    """The experts run as one batched product per expert: every expert a token chose, and the output mixes them by
    the router's softmax over the chosen logits. Quantizing leaves no part float silently: refused by name."""
    from minibt.kernels.quantize import QuantizeError
    folder, ref = tiny_decoder("gpt-oss")
    model = minibt.from_hub(folder)
    experts, ref_mlp = model.layers[0].mlp, ref.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(experts(x), ref_mlp(x)[0], atol=1e-5, rtol=0)
    with pytest.raises(QuantizeError, match="layers.0.mlp.gate_up is a stack of expert weights"):
        minibt.from_hub(folder, quantize="int8")
