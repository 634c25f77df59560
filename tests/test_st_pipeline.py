"""The whole sentence-transformers pipeline against SentenceTransformer.encode, on folders sentence-transformers saved
itself: every Pooling mode (both config formats), Dense and its activations, LayerNorm, Normalize, prompts,
truncate_dim, precision; a Qwen3 checkpoint as a causal embedder (last-token pooling, instruction prompts)."""
import json
import shutil

import numpy as np
import pytest
import torch

import minibt
from minibt.errors import CheckpointError, ConfigError, InputError

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.", "x",
         "Two men pushed carts through the woods while it rained on the hills all afternoon."]


@pytest.fixture(scope="module")
def bert_folder(tiny, minilm, tmp_path_factory):
    """A tiny random BERT (saved by transformers) with all-MiniLM-L6-v2's tokenizer: a Transformer module."""
    shared, _ = tiny("BertModel", vocab_size=30522)
    folder = shutil.copytree(shared, tmp_path_factory.mktemp("st") / "bert")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder)
    return folder


def save_st(src, folder, modules, **kw):
    """SentenceTransformer(modules=[Transformer(src), *modules]).save(folder) -> (folder, the ST model)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    torch.manual_seed(0)
    st = SentenceTransformer(modules=[Transformer(str(src)), *modules(32)], device="cpu", **kw)
    st.save(str(folder))
    return folder, SentenceTransformer(str(folder), device="cpu")


def close(got, want, atol=1e-5):
    want = want.numpy() if isinstance(want, torch.Tensor) else want
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    assert np.abs(got.astype(np.float64) - want.astype(np.float64)).max() <= atol


MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", ("cls", "mean", "max")]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m if isinstance(m, str) else "+".join(m))
def test_every_pooling_mode(bert_folder, tmp_path, mode):
    from sentence_transformers.sentence_transformer.modules import Pooling
    folder, st = save_st(bert_folder, tmp_path / "m", lambda h: [Pooling(h, mode)])
    enc = minibt.Encoder(folder)
    assert enc.get_sentence_embedding_dimension() == st.get_embedding_dimension()
    close(enc.encode(TEXTS, batch_size=2), st.encode(TEXTS, batch_size=2))


@pytest.mark.parametrize("mode", ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"])
def test_older_pooling_config_format(bert_folder, tmp_path, mode):
    """sentence-transformers 2-5 wrote one boolean per mode (and word_embedding_dimension); 6 still reads it."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    folder, _ = save_st(bert_folder, tmp_path / "m", lambda h: [Pooling(h, "mean")])
    flags = {flag: m == mode for flag, m in minibt.embedding.POOLING_FLAGS.items()}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    close(minibt.Encoder(folder).encode(TEXTS), want)


@pytest.mark.parametrize("act", ["Tanh", "GELU", "ReLU", "Identity", "Sigmoid", "SiLU"])
def test_dense_layernorm_normalize(bert_folder, tmp_path, act):
    from sentence_transformers.base.modules import Dense, Normalize
    from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling
    folder, st = save_st(bert_folder, tmp_path / "m", lambda h: [
        Pooling(h, "mean"), Dense(h, 24, activation_function=getattr(torch.nn, act)()),
        Dense(24, 16, activation_function=torch.nn.Tanh(), use_residual=True), LayerNorm(16), Normalize()])
    enc = minibt.Encoder(folder)
    got = enc.encode(TEXTS)
    assert got.shape == (len(TEXTS), 16) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    close(got, st.encode(TEXTS))


def test_prompts_truncate_dim_normalize_and_precision(bert_folder, tmp_path):
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling
    folder, st = save_st(bert_folder, tmp_path / "m", lambda h: [Pooling(h, "weightedmean", include_prompt=False),
                                                                 Normalize()],
                         prompts={"query": "query: ", "passage": "passage: ", "clustering": "cluster these: "},
                         default_prompt_name="clustering")
    enc = minibt.Encoder(folder)
    assert enc.default_prompt_name == "clustering" and enc.prompts["passage"] == "passage: "
    close(enc.encode(TEXTS), st.encode(TEXTS))                                 # the default prompt
    close(enc.encode(TEXTS, prompt_name="passage"), st.encode(TEXTS, prompt_name="passage"))
    close(enc.encode(TEXTS, prompt="search: "), st.encode(TEXTS, prompt="search: "))
    close(enc.encode_query(TEXTS), st.encode_query(TEXTS))
    close(enc.encode_document(TEXTS), st.encode_document(TEXTS))
    from sentence_transformers.util import quantize_embeddings
    floats = st.encode(TEXTS)
    for precision in ("float32", "int8", "uint8", "binary", "ubinary"):
        # the quantizer alone, on the very same floats: exact
        close(minibt.embedding.quantize(torch.from_numpy(floats), precision), quantize_embeddings(floats, precision),
              atol=0)
        # end to end: floats that agree to ~1e-7 can fall on either side of a bucket's edge (a dimension's maximum
        # lands exactly on 255 * step), so int8 / uint8 agree within one bucket, the bits exactly
        for dims, norm in ((None, False), (16, False), (16, True)):
            want = st.encode(TEXTS, precision=precision, truncate_dim=dims, normalize_embeddings=norm)
            got = enc.encode(TEXTS, precision=precision, truncate_dim=dims, normalize_embeddings=norm)
            close(got, want, atol=1 if precision.endswith("int8") else 1e-5)
    as_tensor = enc.encode(TEXTS, precision="ubinary", convert_to_tensor=True)
    assert as_tensor.dtype == torch.uint8 and as_tensor.shape == (len(TEXTS), 4)
    short = minibt.Encoder(folder, truncate_dim=8)
    assert short.get_sentence_embedding_dimension() == 8
    close(short.encode(TEXTS), st.encode(TEXTS, truncate_dim=8))
    # minibt.embed and the CLI take the same arguments
    model, tok = minibt.from_hub(folder), minibt.load_tokenizer(folder)
    got = minibt.embed(model, tok, TEXTS, prompt_name="query", truncate_dim=16)
    close(got.numpy(), st.encode(TEXTS, prompt_name="query", truncate_dim=16))


def test_cli_embed_flags(bert_folder, tmp_path):
    import subprocess
    import sys
    from sentence_transformers.sentence_transformer.modules import Pooling
    folder, st = save_st(bert_folder, tmp_path / "m", lambda h: [Pooling(h, "mean")], prompts={"q": "query: "})
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    for precision, dtype in (("float32", np.float32), ("ubinary", np.uint8)):
        out = tmp_path / f"v-{precision}.npy"
        r = subprocess.run([sys.executable, "-m", "minibt", "embed", "--model", str(folder), "--file", str(corpus),
                            "--out", str(out), "--prompt-name", "q", "--truncate-dim", "24", "--precision", precision],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        close(np.load(out), st.encode(TEXTS, prompt_name="q", truncate_dim=24, precision=precision).astype(dtype))
    r = subprocess.run([sys.executable, "-m", "minibt", "embed", "--model", str(folder), "--file", str(corpus),
                        "--out", str(tmp_path / "i.npy"), "--precision", "int8"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "precision='int8' with --file" in r.stderr
    r = subprocess.run([sys.executable, "-m", "minibt", "embed", "--model", str(folder), "a", "b",
                        "--prompt-name", "nope"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "prompt_name='nope'" in r.stderr and "'q'" in r.stderr


def test_bad_pipelines_and_arguments_are_named(bert_folder, tmp_path):
    from sentence_transformers.base.modules import Dense
    from sentence_transformers.sentence_transformer.modules import Pooling
    folder, _ = save_st(bert_folder, tmp_path / "m", lambda h: [Pooling(h, "mean"), Dense(h, 8)])
    enc = minibt.Encoder(folder)
    with pytest.raises(InputError, match=r"prompt_name='nope': this model's prompts are \['document', 'query'\]"):
        enc.encode(TEXTS, prompt_name="nope")
    with pytest.raises(InputError, match="truncate_dim=9 must be an integer from 1 to 8"):
        enc.encode(TEXTS, truncate_dim=9)
    with pytest.raises(InputError, match="truncate_dim=0"):
        minibt.Encoder(folder, truncate_dim=0)
    with pytest.raises(InputError, match="precision='int4'"):
        enc.encode(TEXTS, precision="int4")
    with pytest.raises(InputError, match="at least 2 texts"):
        enc.encode(TEXTS[:1], precision="int8")
    modules = json.loads((folder / "modules.json").read_text())

    def edit(mods=None, **files):
        (folder / "modules.json").write_text(json.dumps(mods or modules))
        for name, value in files.items():
            (folder / name.replace("__", "/")).write_text(json.dumps(value))

    edit(modules + [{"idx": 3, "name": "3", "path": "3_WeightedLayerPooling",
                     "type": "sentence_transformers.models.WeightedLayerPooling"}])
    with pytest.raises(ConfigError, match=r"module 3 is 'sentence_transformers.models.WeightedLayerPooling' "
                                          r"\(path '3_WeightedLayerPooling'\); minibt runs"):
        minibt.Encoder(folder)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    edit(**{"1_Pooling__config.json": pooling | {"pooling_mode": "median"}})
    with pytest.raises(ConfigError, match="1_Pooling/config.json: pooling_mode 'median' is not supported"):
        minibt.Encoder(folder)
    edit(**{"1_Pooling__config.json": pooling})
    dense = json.loads((folder / "2_Dense" / "config.json").read_text())
    edit(**{"2_Dense__config.json": dense | {"activation_function": "mypackage.Swish"}})
    with pytest.raises(ConfigError, match="activation_function 'mypackage.Swish' is not supported"):
        minibt.Encoder(folder)
    edit(**{"2_Dense__config.json": dense | {"out_features": 9}})
    with pytest.raises(CheckpointError, match=r"'linear.weight' has shape \(8, 32\), the module's config.json says"):
        minibt.Encoder(folder)
    edit(**{"2_Dense__config.json": dense})
    (folder / "2_Dense" / "model.safetensors").rename(folder / "2_Dense" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: no model.safetensors.*never unpickles"):
        minibt.Encoder(folder)
    (folder / "2_Dense" / "pytorch_model.bin").rename(folder / "2_Dense" / "model.safetensors")
    edit(**{"config_sentence_transformers.json": {"prompts": {"q": "q: "}, "default_prompt_name": "p"}})
    with pytest.raises(ConfigError, match="default_prompt_name 'p' is not one of its prompts"):
        minibt.embedding.Pipeline.read(folder, 32)


def test_serve_prompt_name_and_dimensions(bert_folder, tmp_path):
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling
    from starlette.testclient import TestClient

    from minibt.tools.serve import app
    folder, st = save_st(bert_folder, tmp_path / "m", lambda h: [Pooling(h, "mean", include_prompt=False),
                                                                 Normalize()], prompts={"q": "query: "})
    with TestClient(app(minibt.from_hub(folder), minibt.load_tokenizer(folder))) as c:
        r = c.post("/embed", json={"inputs": TEXTS, "prompt_name": "q"})
        assert r.status_code == 200
        close(np.array(r.json(), dtype=np.float32), st.encode(TEXTS, prompt_name="q"))
        r = c.post("/embed", json={"inputs": TEXTS, "prompt_name": "nope"})
        assert r.status_code == 422 and "prompt_name" in r.json()["error"] and "'q'" in r.json()["error"]
        r = c.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 8, "encoding_format": "float"})
        want = torch.nn.functional.normalize(torch.from_numpy(st.encode(TEXTS))[:, :8], dim=-1)
        close(np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32), want)


# ------------------------------------------------------------------------------------ Qwen3 as an embedder

def qwen_tokenizer(folder):
    """A word-level tokenizer that ends every text with <|endoftext|> (as Qwen3-Embedding's does) and pads left."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for t in TEXTS + ["Instruct: Given a web search query, retrieve relevant passages\nQuery:"]
                    for w in t.replace(".", " ").replace(",", " ").replace(":", " ").split()})
    vocab = {t: i for i, t in enumerate(["[UNK]"] + words + [".", ",", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                            eos_token="<|endoftext|>", model_max_length=128, padding_side="left").save_pretrained(folder)
    return len(vocab) + 1


@pytest.fixture(scope="module")
def qwen3_embedder(tmp_path_factory):
    import transformers
    src = tmp_path_factory.mktemp("qwen3-src")
    vocab = qwen_tokenizer(src)
    torch.manual_seed(3)
    cfg = transformers.Qwen3Config(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=128)
    ref = transformers.Qwen3Model(cfg).eval()
    ref.save_pretrained(src, safe_serialization=True)
    return src, ref


@pytest.mark.parametrize("attn", ["naive", "sdpa", "varlen", "flash", "tiled", "flex"])
def test_qwen3_model_as_an_encoder(qwen3_embedder, attn):
    """Qwen3Model (no LM head) loads as head='base'; its hidden states equal transformers' on a left-padded batch."""
    from conftest import left_padded
    src, ref = qwen3_embedder
    model = minibt.from_hub(src, attn=attn)
    assert model.head == "base"
    ids, mask = left_padded(ref.config.vocab_size, 0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() <= 1e-4


def test_qwen3_embedding_pipeline(qwen3_embedder, tmp_path):
    """Qwen3-Embedding's recipe: last-token pooling, Normalize, an instruction prompt for queries only."""
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling
    src, _ = qwen3_embedder
    query = "Instruct: Given a web search query, retrieve relevant passages\nQuery:"
    folder, st = save_st(src, tmp_path / "qwen3-embedding", lambda h: [Pooling(h, "lasttoken"), Normalize()],
                         prompts={"query": query, "document": ""})
    enc = minibt.Encoder(folder)
    close(enc.encode_query(TEXTS, batch_size=3), st.encode_query(TEXTS, batch_size=3))
    close(enc.encode_document(TEXTS), st.encode_document(TEXTS))
    close(enc.encode(TEXTS, truncate_dim=16, normalize_embeddings=True),
          st.encode(TEXTS, truncate_dim=16, normalize_embeddings=True))


def test_hub_downloads_every_module_and_no_pickle():
    """snapshot_download's filter with minibt.hub.ALLOW: each module's config and safetensors, never a pickle."""
    from huggingface_hub.utils import filter_repo_objects

    from minibt.hub import ALLOW
    files = ["modules.json", "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
             "3_LayerNorm/model.safetensors", "12_Normalize/config.json", "2_Dense/pytorch_model.bin",
             "pytorch_model.bin", "onnx/model.onnx", "README.md"]
    assert list(filter_repo_objects(files, allow_patterns=ALLOW)) == files[:6]
