"""Property-based fuzzing of the boundaries (docs/reliability.md gives the budget): corrupted safetensors files and
configs through the real loader, model inputs, generation arguments. The only outcomes allowed are a correct result
or a MinibtError: never another exception type, and never memory growth beyond the checkpoint's size."""
import json
import resource
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minibt
from minibt.errors import MinibtError
from conftest import left_padded

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def bert_bytes(tiny):
    folder = tiny("BertModel")[0]
    return folder, (folder / "model.safetensors").read_bytes(), json.loads((folder / "config.json").read_text())


def test_fuzz_safetensors_bytes(bert_bytes, tmp_path_factory):
    folder, original, _ = bert_bytes
    work = tmp_path_factory.mktemp("fuzz-st")
    shutil.copy(folder / "config.json", work / "config.json")
    header_end = 8 + int.from_bytes(original[:8], "little")
    before = peak_rss_mib()

    @FUZZ
    @given(st.data())
    def one(data):
        blob = bytearray(original)
        for _ in range(data.draw(st.integers(1, 8))):
            kind = data.draw(st.sampled_from(["header-byte", "length", "truncate", "digit", "data-byte"]))
            if kind == "header-byte" and len(blob) > 8:
                blob[data.draw(st.integers(8, min(header_end, len(blob)) - 1))] = data.draw(st.integers(0, 255))
            elif kind == "length" and len(blob) >= 8:
                blob[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
            elif kind == "truncate":
                del blob[data.draw(st.integers(0, len(blob))):]
            elif kind == "digit":                  # shapes and offsets: change one digit of the header
                digits = [i for i in range(8, min(header_end, len(blob))) if chr(blob[i]).isdigit()]
                if digits:
                    blob[data.draw(st.sampled_from(digits))] = ord(str(data.draw(st.integers(0, 9))))
            elif kind == "data-byte":
                if len(blob) > header_end:
                    blob[data.draw(st.integers(header_end, len(blob) - 1))] = data.draw(st.integers(0, 255))
        (work / "model.safetensors").write_bytes(bytes(blob))
        try:
            model = minibt.from_hub(work)
        except MinibtError:
            return
        ids = torch.randint(0, model.config.vocab_size, (2, 5))
        model(ids)                              # a loaded model runs (data-byte changes only alter values)
    one()
    assert peak_rss_mib() - before < 256       # no allocation sized by a corrupted header


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                                  st.integers(), max_size=2))


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_fuzz_config_fields(tiny, tiny_decoder, tmp_path_factory, which):
    folder = tiny("BertModel")[0] if which == "bert" else tiny_decoder("llama-gqa")[0]
    work = tmp_path_factory.mktemp(f"fuzz-cfg-{which}")
    for f in folder.iterdir():
        if f.is_file():
            shutil.copy(f, work / f.name)
    config = json.loads((folder / "config.json").read_text())
    keys = sorted(k for k in config if k not in ("model_type",)) + ["rope_scaling", "head_dim", "num_key_value_heads"]

    @FUZZ
    @given(st.dictionaries(st.sampled_from(keys), _VALUES, min_size=1, max_size=3))
    def one(changes):
        (work / "config.json").write_text(json.dumps({**config, **changes}))
        try:
            model = minibt.from_hub(work)
        except MinibtError:
            return
        ids = torch.randint(0, model.config.vocab_size, (1, 4))
        with torch.no_grad():
            model(ids)
    one()


@pytest.fixture(scope="module")
def bert(tiny):
    return minibt.from_hub(tiny("BertModel")[0])


@FUZZ
@given(ids_dtype=st.sampled_from([torch.int64, torch.int32, torch.float32, torch.bool, torch.uint8]),
       shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
       low=st.integers(-3, 100), mask=st.sampled_from(["none", "ones", "twos", "float", "short", "bool", "random"]),
       types=st.sampled_from(["none", "zeros", "big", "negative", "short"]),
       attn=st.sampled_from(["naive", "sdpa", "varlen", "flash", "fused", "auto", "tiled"]))
def test_fuzz_model_inputs(bert, ids_dtype, shape, low, mask, types, attn):
    ids = (torch.randint(max(low, 0), max(low, 0) + 10, shape) - (1 if low < 0 else 0)).to(ids_dtype)
    m = {"none": None, "ones": torch.ones(shape, dtype=torch.long), "twos": torch.full(shape, 2),
         "float": torch.ones(shape), "short": torch.ones(shape[:-1] or [1], dtype=torch.long),
         "bool": torch.ones(shape, dtype=torch.bool),
         "random": torch.randint(0, 2, shape)}[mask]
    t = {"none": None, "zeros": torch.zeros(shape, dtype=torch.long), "big": torch.full(shape, 7),
         "negative": torch.full(shape, -1), "short": torch.zeros(shape[:-1] or [1], dtype=torch.long)}[types]
    bert.set_attention(attn)
    try:
        out = bert(ids, attention_mask=m, token_type_ids=t)
    except MinibtError:
        return
    finally:
        bert.set_attention("auto")
    assert out.last_hidden_state.shape == (*ids.shape, 32) and torch.isfinite(out.last_hidden_state).all()


@pytest.fixture(scope="module")
def llama(tiny_decoder):
    return minibt.from_hub(tiny_decoder("llama-gqa")[0])


@FUZZ
@given(max_new_tokens=st.one_of(st.integers(-3, 4), st.floats(-1, 3), st.none()),
       do_sample=st.booleans(), temperature=st.one_of(st.floats(-1, 3), st.just(float("nan")), st.integers(-1, 2)),
       top_k=st.one_of(st.none(), st.integers(-2, 200)), top_p=st.one_of(st.none(), st.floats(-1, 2), st.just(float("nan"))),
       seed=st.one_of(st.none(), st.integers(-2, 5)), right_pad=st.booleans())
def test_fuzz_generation_arguments(llama, max_new_tokens, do_sample, temperature, top_k, top_p, seed, right_pad):
    ids, mask = left_padded(99, 0)
    if right_pad:
        ids, mask = ids.flip(1), mask.flip(1)
    try:
        out = llama.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except MinibtError:
        return
    assert out.shape == (3, ids.shape[1] + max_new_tokens) or out.shape[1] < ids.shape[1] + max_new_tokens
    assert int(out.min()) >= 0 and int(out.max()) < 99
