"""Arguments of the Python API, each refused by a MinibtError that names it (issue 27, class 7): Encoder.encode's
texts, generate's options, position ids and caches, from_hub's dtype and device, a tokenizer's padding side, and a
user backend that ignores the mask although the first call it sees has no padding."""
import pytest
import torch

import minibt
from minibt import attention
from minibt.attention import KVCache
from minibt.errors import BackendError, ConfigError, InputError
from conftest import left_padded


@pytest.fixture(scope="module")
def llama(tiny_decoder):
    return minibt.from_hub(tiny_decoder("llama-gqa")[0])


@pytest.fixture(scope="module")
def encoder(minilm):
    return minibt.Encoder(minilm)


@pytest.mark.parametrize("texts, fault", [(5, "texts must be a string or a list of strings, got int"),
                                          (None, "texts must be a string or a list of strings, got NoneType"),
                                          (["a", 3], r"texts\[1\] is a int, not a string")])
def test_encode_texts_named(encoder, texts, fault):
    with pytest.raises(InputError, match=fault):
        encoder.encode(texts)


@pytest.mark.parametrize("size", [0, 2.0, True])
def test_encode_batch_size_named(encoder, size):
    with pytest.raises(InputError, match=f"batch_size={size!r}: must be an integer >= 1"):
        encoder.encode(["a"], batch_size=size)


@pytest.mark.parametrize("kwargs, fault", [
    (dict(seed=2**64), r"seed=18446744073709551616: must be an integer in \[0, 2\*\*64\)"),
    (dict(seed=10**400, do_sample=True), r"seed=1000000000000000000000000000000000000000\.\.\. \(401 characters\)"),
    (dict(temperature=1e-40, do_sample=True), r"temperature=1e-40: must be >= 0.0001 when sampling"),
    (dict(temperature=10**400, do_sample=True), "temperature=.*: must be a finite number"),
    (dict(temperature=float("-inf")), "temperature=-inf: must be a finite number"),
    (dict(do_sample="False"), "do_sample='False': must be True or False"),
    (dict(do_sample=1), "do_sample=1: must be True or False"),
    (dict(eos_token_id="2"), r"eos_token_id='2': must be an id or a list of ids, integers in \[0, 99\)"),
    (dict(eos_token_id=[2, "3"]), r"eos_token_id=\[2, '3'\]"),
    (dict(eos_token_id=99), r"eos_token_id=99: .*\[0, 99\)"),
    (dict(pad_token_id=-1), r"pad_token_id=-1: must be an id"),
])
def test_generation_options_named(llama, kwargs, fault):
    ids, mask = left_padded(99, 0)
    with pytest.raises(InputError, match=fault):
        llama.generate(ids, attention_mask=mask, max_new_tokens=2, **kwargs)


def test_large_finite_temperature_samples(llama):
    """A huge temperature that is a finite float (even given as an int) samples (nearly uniformly); no overflow."""
    ids, mask = left_padded(99, 0)
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True, temperature=10**300, seed=1)
    assert out.shape == (3, ids.shape[1] + 3) and int(out.max()) < 99


def test_a_prompt_row_of_padding_only_is_refused(llama):
    ids, mask = left_padded(99, 0, lengths=(4, 0, 2))
    with pytest.raises(InputError, match=r"attention_mask rows \[1\] are padding only"):
        llama.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_base_head_decoder_generate_is_refused(tiny_decoder):
    base = minibt.from_hub(tiny_decoder("llama-gqa")[0], head="base")
    ids, mask = left_padded(99, 0)
    with pytest.raises(InputError, match="generate needs the causal-LM head; this llama was loaded with head='base'"):
        base.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_kv_cache_larger_than_memory_names_its_size(llama):
    """Checked before anything is allocated: a cache beyond the machine's memory is refused with its size."""
    with pytest.raises(InputError, match=r"a KV cache of [\d.]+ GiB \(2 layers .* batch 100000000 .* is more than "
                                         r"the device's [\d.]+ GiB of memory"):
        KVCache.for_model(llama, 10**8, 64)


def test_allocator_failure_becomes_a_typed_error(llama, monkeypatch):
    from minibt.attention import cache as cache_module

    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")
    monkeypatch.setattr(cache_module.torch, "zeros", refuse)
    with pytest.raises(InputError, match=r"a KV cache of .* could not be allocated \(DefaultCPUAllocator"):
        KVCache.for_model(llama, 2, 8)


@pytest.mark.parametrize("positions, fault", [
    (torch.full((1, 3), 64), r"position_ids hold 64, outside the model's positions \[0, 64\)"),
    (torch.tensor([[0, -1, 2]]), r"position_ids hold -1"),
    (torch.tensor([[0.0, 1.0, 2.0]]), "position_ids must hold integer positions, got dtype torch.float32"),
    ([[0, 1, 2]], "position_ids must be a torch.Tensor"),
])
def test_position_ids_are_checked(llama, tiny_decoder, positions, fault):
    ids = torch.tensor([[5, 6, 7]])
    opt = minibt.from_hub(tiny_decoder("opt-pre-ln")[0])
    for model in (llama, opt):                                          # both have 64 positions
        with pytest.raises(InputError, match=fault):
            model(ids, position_ids=positions)


def test_a_tuple_past_key_values_is_refused(llama):
    ids = torch.tensor([[5, 6, 7]])
    past = tuple((torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8)) for _ in range(2))
    with pytest.raises(InputError, match="past_key_values must be a minibt KVCache .* got tuple"):
        llama(ids, past_key_values=past)


@pytest.mark.parametrize("kwargs, error, fault", [
    (dict(dtype=torch.float8_e4m3fn), ConfigError, "dtype must be float32, bfloat16, float16 or float64.*float8"),
    (dict(dtype=torch.int8), ConfigError, "got torch.int8"),
    (dict(device="tpu"), InputError, "device='tpu': not a device torch knows"),
    (dict(device="cuda:7" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"), InputError,
     "device='cuda:.*': (no cuda device on this machine|this machine has)"),
])
def test_from_hub_dtype_and_device(minilm, kwargs, error, fault):
    with pytest.raises(error, match=fault):
        minibt.from_hub(minilm, **kwargs)


def test_padding_side_typo_is_refused(minilm):
    tok = minibt.load_tokenizer(minilm)
    with pytest.raises(InputError, match="padding_side='rigth': must be 'right' or 'left'"):
        tok(["a b", "a"], padding_side="rigth")
    assert tok(["a b", "a"], padding_side="left")["attention_mask"][1, 0] == 0        # the real sides still work


def test_backend_ignoring_the_mask_caught_on_an_unpadded_first_call(tiny):
    """The first call has no padding (one row), where ignoring the mask is invisible: the check runs the backend on
    a padded copy too."""
    bert = minibt.from_hub(tiny("BertModel")[0])

    def ignores_mask(q, k, v, *, mask, scale):
        return attention.naive(q, k, v, mask=attention.AttnMask(causal=mask.causal, q_offset=mask.q_offset),
                               scale=scale)
    attention.register("ignores-mask", ignores_mask)
    try:
        with pytest.raises(BackendError, match="'ignores-mask' differs from the naive spec .* on a padded input"):
            bert.set_attention("ignores-mask")(torch.tensor([[5, 6, 7, 8]]))
        attention.register("honours-mask", attention.naive)                 # a correct one passes both checks
        out = bert.set_attention("honours-mask")(torch.tensor([[5, 6, 7, 8]])).last_hidden_state
        assert torch.allclose(out, bert.set_attention("naive")(torch.tensor([[5, 6, 7, 8]])).last_hidden_state)
    finally:
        attention._REGISTRY.pop("ignores-mask", None)
        attention._REGISTRY.pop("honours-mask", None)
        bert.set_attention("auto")



def test_default_batch_tokens_never_refuses(tiny, minilm, tmp_path):
    """A model whose longest text is 8192 tokens (> 4096) embeds two short texts with the default budget; an explicit
    budget below the longest text is still refused by name."""
    import json
    import shutil
    folder = tmp_path / "long"
    shutil.copytree(tiny("BertModel", vocab_size=30522, max_position_embeddings=8192)[0], folder)
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder)
    config = json.loads((minilm / "tokenizer_config.json").read_text()) | {"model_max_length": 8192}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model, tok = minibt.from_hub(folder), minibt.load_tokenizer(folder)
    assert minibt.embed(model, tok, ["a", "b"]).shape == (2, 32)
    assert minibt.Encoder(folder).encode(["a", "b"]).shape == (2, 32)
    with pytest.raises(InputError, match="batch_tokens=4096 is below the longest possible text"):
        minibt.embed(model, tok, ["a"], batch_tokens=4096)


@pytest.mark.parametrize("flag", ["convert_to_numpy", "convert_to_tensor", "normalize_embeddings"])
def test_encode_output_flags_are_booleans(encoder, flag):
    """A truthy string such as "False" is refused, never taken as True (hostile pass, round 3)."""
    with pytest.raises(InputError, match=f"{flag}='False': must be True or False"):
        encoder.encode(["a"], **{flag: "False"})
