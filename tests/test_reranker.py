"""minibt.Reranker: sentence-transformers' CrossEncoder habits (predict, rank) on cross-encoders saved by
sentence-transformers, and Qwen3-Reranker-style LLM rerankers against the model card's computation in transformers;
`minibt serve` /rerank with an LLM reranker."""
from __future__ import annotations

import asyncio
import copy
import json
import shutil

import numpy as np
import pytest
import torch

import minibt
from minibt.errors import ConfigError, InputError

QUERY = "what is the capital of france"
DOCS = ["paris is the capital city of france", "the fox jumps over the dog", "money in the river bank",
        "a big red cat " * 20, "where", "the capital of france is a big city on a river"]
WORDS = ("the a fox dog cat runs jumps over under big small red blue query answer paris france capital city river "
         "bank money water is of what where who how why on in").split()


def spread(ref, folder, num_labels):
    """Random tiny classifiers give every pair nearly the same logits: the last layer scaled by 100 (their gaps, and
    float32 noise with them) and centred on the test's pairs, so that the order means something and a sigmoid is
    not a flat 0 or 1 (the layer is affine: 100 (W h + b - mean) = 100 W h + 100 (b - mean))."""
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(folder)
    batch = hf_tok([QUERY] * len(DOCS), DOCS, padding=True, truncation=True, return_tensors="pt")
    last = [m for m in ref.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels][-1]
    with torch.no_grad():
        logits = ref(**batch).logits
        last.weight.mul_(100.0)
        last.bias.copy_(100.0 * (last.bias - logits.mean(0)))


def word_tokenizer(specials: list, pair: str, single: str, unk: str, **kwargs):
    """A tokenizers WordLevel over WORDS with the family's special tokens and text-pair template, as transformers'
    PreTrainedTokenizerFast (which saves tokenizer.json and tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    names = {t for t in specials if t in single + pair}
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(t, vocab[t]) for t in sorted(names)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, model_max_length=64, **kwargs)


def save_tokenizer(family: str, folder):
    if family == "bert":          # a real BertTokenizer from vocab.txt, as BERT cross-encoders ship
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64,
                                                                  "tokenizer_class": "BertTokenizer"}))
    elif family == "xlm-roberta":                 # pad id 1, as XLMRobertaConfig; <s> A </s></s> B </s>, no types
        word_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s> </s> $B </s>", "<s> $A </s>", "<unk>",
                       bos_token="<s>", eos_token="</s>", pad_token="<pad>", cls_token="<s>", sep_token="</s>",
                       model_input_names=["input_ids", "attention_mask"]).save_pretrained(folder)
    else:                                         # modernbert: pad 0, cls 1, sep 2 as in conftest.encoder_config
        word_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], "[CLS] $A [SEP] $B [SEP]", "[CLS] $A [SEP]",
                       "[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                       model_input_names=["input_ids", "attention_mask"]).save_pretrained(folder)


FAMILIES = {"bert": "BertForSequenceClassification", "xlm-roberta": "XLMRobertaForSequenceClassification",
            "modernbert": "ModernBertForSequenceClassification"}


@pytest.fixture(scope="module")
def cross_encoders(tiny, tmp_path_factory):
    """cross_encoders(family, num_labels=1) -> a folder written by sentence-transformers' CrossEncoder.save_pretrained
    around a tiny random *ForSequenceClassification saved by transformers."""
    from sentence_transformers import CrossEncoder
    cache = {}

    def make(family, num_labels=1):
        if (family, num_labels) not in cache:
            ref = copy.deepcopy(tiny(FAMILIES[family], num_labels=num_labels)[1])
            src = tmp_path_factory.mktemp(f"{family}-hf")
            save_tokenizer(family, src)
            spread(ref, src, num_labels)
            ref.save_pretrained(src, safe_serialization=True)
            out = tmp_path_factory.mktemp(f"{family}-st")
            CrossEncoder(str(src), device="cpu").save_pretrained(str(out))
            cache[family, num_labels] = out
        return cache[family, num_labels]
    return make


# -------------------------------------------------------------------------------------------- cross-encoders

@pytest.mark.parametrize("family", FAMILIES)
def test_cross_encoder_predict_and_rank_equal_sentence_transformers(cross_encoders, family):
    from sentence_transformers import CrossEncoder
    folder = cross_encoders(family)
    assert (folder / "config_sentence_transformers.json").is_file()          # the folder is what ST writes
    ce, rr = CrossEncoder(str(folder), device="cpu"), minibt.Reranker(folder)
    assert rr.kind == "cross-encoder" and rr.max_length == 64
    pairs = [(QUERY, d) for d in DOCS]
    want, got = ce.predict(pairs, batch_size=2), rr.predict(pairs, batch_size=2)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (len(DOCS),)
    assert np.abs(got - want).max() <= 1e-4                                    # sigmoid, ST's default for one label
    raw_want = ce.predict(pairs, activation_fn=torch.nn.Identity())
    raw = rr.predict(pairs, batch_size=2, activation_fn=torch.nn.Identity())
    diff = np.abs(raw - raw_want).max()
    assert diff <= 1e-4 and np.diff(np.sort(raw)).min() > 10 * diff        # the order is far above the noise
    assert np.abs(got - 1 / (1 + np.exp(-raw))).max() < 1e-6
    ranked, ranked_want = rr.rank(QUERY, DOCS, return_documents=True), ce.rank(QUERY, DOCS, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in ranked_want]
    assert all(r["text"] == DOCS[r["corpus_id"]] and set(r) == {"corpus_id", "score", "text"} for r in ranked)
    assert max(abs(a["score"] - b["score"]) for a, b in zip(ranked, ranked_want)) <= 1e-4
    top = rr.rank(QUERY, DOCS, top_k=2)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in ranked_want[:2]] and "text" not in top[0]
    one = rr.predict([QUERY, DOCS[0]])                                         # one pair: one score
    assert np.ndim(one) == 0 and abs(float(one) - want[0]) <= 1e-4
    t = rr.predict(pairs[:2], convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (2,)
    listed = rr.predict(pairs[:2], convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 2
    assert rr.predict([]).shape == (0,)


def test_activation_read_from_the_folder_as_sentence_transformers_does(cross_encoders, tmp_path):
    from sentence_transformers import CrossEncoder
    pairs = [(QUERY, d) for d in DOCS[:3]]
    folder = shutil.copytree(cross_encoders("bert"), tmp_path / "identity")
    st = json.loads((folder / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st | {
        "activation_fn": "torch.nn.modules.linear.Identity"}))
    raw = minibt.Reranker(folder).predict(pairs)
    assert np.abs(raw - CrossEncoder(str(folder), device="cpu").predict(pairs)).max() <= 1e-4
    assert raw.min() < 0 or raw.max() > 1                                      # logits, no sigmoid
    # the name CrossEncoder wrote before v4, in config.json
    old = shutil.copytree(cross_encoders("bert"), tmp_path / "old")
    (old / "config_sentence_transformers.json").write_text(json.dumps(st | {"activation_fn": None}))
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(config | {
        "sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}))
    assert np.abs(minibt.Reranker(old).predict(pairs) - raw).max() <= 1e-6
    # two labels: identity by default, (N, 2); apply_softmax; rank needs one score
    two = cross_encoders("bert", num_labels=2)
    rr, ce = minibt.Reranker(two), CrossEncoder(str(two), device="cpu")
    got = rr.predict(pairs)
    assert got.shape == (3, 2) and np.abs(got - ce.predict(pairs)).max() <= 1e-4
    soft = rr.predict(pairs, apply_softmax=True)
    assert np.abs(soft - ce.predict(pairs, apply_softmax=True)).max() <= 1e-4 and np.allclose(soft.sum(1), 1)
    with pytest.raises(InputError, match="2 labels"):
        rr.rank(QUERY, DOCS)


# ----------------------------------------------------------------------------------- LLM reranker (Qwen3 kind)

PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct '
          'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
LLM_WORDS = sorted(set(WORDS + ("Judge whether Document meets requirements based on Query and Instruct provided "
                                "Note that answer can only be yes or no system user assistant Given web search "
                                "retrieve relevant passages").split()))
# Qwen3-Reranker's prompt as a sentence-transformers chat template: the system message (its prompt) is the instruction
ROLE = '{{{{ messages | selectattr("role", "eq", "{}") | map(attribute="content") | first{} }}}}'
CHAT_TEMPLATE = (PREFIX + "<Instruct>: " + ROLE.format("system", f' | default("{DEFAULT_INSTRUCTION}")')
                 + "\n<Query>: " + ROLE.format("query", "") + "\n<Document>: " + ROLE.format("document", "") + SUFFIX)


def llm_tokenizer(words):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["[UNK]"] + words + ["<", ">:", ".", '"', '".', ","])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", model_max_length=256)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """(folder, transformers Qwen3ForCausalLM, its tokenizer): a tiny random Qwen3 with a tokenizer that has the
    prompt's special tokens and "yes" / "no"."""
    import transformers
    hf_tok = llm_tokenizer(LLM_WORDS)
    torch.manual_seed(2)
    cfg = transformers.Qwen3Config(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=len(hf_tok),
                                   max_position_embeddings=256, tie_word_embeddings=True)
    ref = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        ref.model.norm.weight.mul_(10.0)            # spread the scores (log-odds 0.13 +- 0.2)
    folder = tmp_path_factory.mktemp("qwen3-reranker")
    ref.save_pretrained(folder, safe_serialization=True)
    hf_tok.save_pretrained(folder)
    return folder, ref, transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")


def model_card_scores(ref, hf_tok, pairs, instruction=DEFAULT_INSTRUCTION, max_length=256, raw=False):
    """Qwen3-Reranker's model card, in transformers: format_instruction, process_inputs, compute_logits."""
    prefix = hf_tok.encode(PREFIX, add_special_tokens=False)
    suffix = hf_tok.encode(SUFFIX, add_special_tokens=False)
    texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
    inputs = hf_tok(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                    max_length=max_length - len(prefix) - len(suffix))
    inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
    batch = hf_tok.pad(inputs, padding=True, return_tensors="pt")
    assert bool(batch["attention_mask"][:, -1].all())                          # left-padded
    with torch.inference_mode():
        logits = ref(**batch).logits[:, -1, :]
    yes, no = hf_tok.convert_tokens_to_ids("yes"), hf_tok.convert_tokens_to_ids("no")
    if raw:
        return (logits[:, yes] - logits[:, no]).numpy()
    return torch.stack([logits[:, no], logits[:, yes]], dim=1).log_softmax(1)[:, 1].exp().numpy()


PAIRS = [(QUERY, d) for d in DOCS] + [("who runs", "the dog runs under the blue water"), ("how", "why")]


def test_llm_reranker_equals_the_model_card_in_transformers(llm):
    folder, ref, hf_tok = llm
    rr = minibt.Reranker(folder)
    assert rr.kind == "llm" and rr.max_length == 256 and rr.instruction == DEFAULT_INSTRUCTION
    want = model_card_scores(ref, hf_tok, PAIRS)
    got = rr.predict(PAIRS, batch_size=3)                     # left-padded batches of different lengths
    diff = np.abs(got - want).max()
    assert got.dtype == np.float32 and diff <= 1e-4 and np.diff(np.sort(want)).min() > 10 * diff
    raw = rr.predict(PAIRS, activation_fn=torch.nn.Identity())               # the log-odds, as LogitScore
    assert np.abs(raw - model_card_scores(ref, hf_tok, PAIRS, raw=True)).max() <= 1e-4
    docs = [d for _, d in PAIRS[:len(DOCS)]]
    ranked = rr.rank(QUERY, docs, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == sorted(range(len(docs)), key=lambda i: -want[i])
    assert ranked[0]["text"] == docs[ranked[0]["corpus_id"]]
    custom = "Judge whether the document answers the question"
    assert np.abs(minibt.Reranker(folder, instruction=custom).predict(PAIRS)
                  - model_card_scores(ref, hf_tok, PAIRS, instruction=custom)).max() <= 1e-4
    short = minibt.Reranker(folder, max_length=70)            # the middle cut from its end; prefix and suffix whole
    assert np.abs(short.predict(PAIRS) - model_card_scores(ref, hf_tok, PAIRS, max_length=70)).max() <= 1e-4


def test_llm_reranker_reads_a_sentence_transformers_folder_as_it_does(llm, tmp_path):
    """With Qwen3-Reranker's prompt as its chat template, sentence-transformers scores the folder as the model card
    does, and saves LogitScore's token ids and its prompts: minibt reads them to the same scores."""
    from sentence_transformers import CrossEncoder
    folder, ref, hf_tok = llm
    src = shutil.copytree(folder, tmp_path / "src")
    (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    ce = CrossEncoder(str(src), device="cpu")
    want = ce.predict(PAIRS)
    assert np.abs(want - model_card_scores(ref, hf_tok, PAIRS)).max() <= 1e-4
    ce.save_pretrained(str(tmp_path / "st"))
    assert json.loads((tmp_path / "st" / "1_LogitScore" / "config.json").read_text())["true_token_id"] == \
        hf_tok.convert_tokens_to_ids("yes")
    assert np.abs(minibt.Reranker(tmp_path / "st").predict(PAIRS) - want).max() <= 1e-4
    custom = "Judge whether the document answers the question"
    CrossEncoder(str(src), device="cpu", prompts={"qa": custom}, default_prompt_name="qa").save_pretrained(
        str(tmp_path / "prompted"))
    assert np.abs(minibt.Reranker(tmp_path / "prompted").predict(PAIRS)
                  - model_card_scores(ref, hf_tok, PAIRS, instruction=custom)).max() <= 1e-4
    # LogitScore's ids are what count, not "yes" / "no": a false token of None scores logit(true) alone
    logit = tmp_path / "st" / "1_LogitScore" / "config.json"
    logit.write_text(json.dumps({"true_token_id": hf_tok.convert_tokens_to_ids("capital"), "false_token_id": None}))
    ce = CrossEncoder(str(tmp_path / "st"), device="cpu")
    assert np.abs(minibt.Reranker(tmp_path / "st").predict(PAIRS) - ce.predict(PAIRS)).max() <= 1e-4
    # a sentence-transformers LLM reranker whose template is not Qwen3-Reranker's prompt is refused by name
    (tmp_path / "st" / "chat_template.jinja").write_text("{{ messages[0].content }}")
    with pytest.raises(ConfigError, match="Qwen3-Reranker"):
        minibt.Reranker(tmp_path / "st")


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_input_and_checkpoints_are_named(llm, cross_encoders, tiny, tmp_path):
    folder = llm[0]
    for rr in (minibt.Reranker(folder), minibt.Reranker(cross_encoders("bert"))):
        for call, words in [
                (lambda: rr.predict([("q", 3)]), r"pairs\[0\] must be a \(query, document\) pair of 2 strings"),
                (lambda: rr.predict([("q", "d"), ("a", "b", "c")]), r"pairs\[1\]"),
                (lambda: rr.predict(["q", 3]), "the pair must be"),
                (lambda: rr.predict("text"), "not a string"),
                (lambda: rr.predict([("q", "d")], batch_size=0), "batch_size=0"),
                (lambda: rr.rank("q", []), "documents is an empty list"),
                (lambda: rr.rank("q", ["ok", 5]), r"documents\[1\] must be a string"),
                (lambda: rr.rank("q", "one string"), "documents must be a list"),
                (lambda: rr.rank(3, ["a"]), "query must be a string"),
                (lambda: rr.rank("q", ["a"], top_k=0), "top_k=0"),
                (lambda: rr.rank("q", ["a"], batch_size=-1), "batch_size=-1")]:
            with pytest.raises(InputError, match=words):
                call()
    with pytest.raises(InputError, match="max_length=0"):
        minibt.Reranker(folder, max_length=0)
    with pytest.raises(InputError, match="leaves no room"):
        minibt.Reranker(folder, max_length=20).predict([("q", "d")])
    with pytest.raises(ConfigError, match="'BertModel' is not a reranker"):
        minibt.Reranker(tiny("BertModel")[0])
    embedder = shutil.copytree(folder, tmp_path / "embedder")         # a decoder with Pooling: sentence embeddings
    (embedder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    with pytest.raises(ConfigError, match="minibt.Encoder"):
        minibt.Reranker(embedder)
    no_yes = shutil.copytree(folder, tmp_path / "no-yes")             # a tokenizer without "yes" and "no"
    (no_yes / "tokenizer.json").unlink()
    llm_tokenizer([w for w in LLM_WORDS if w not in ("yes", "no")]).save_pretrained(no_yes)
    with pytest.raises(ConfigError, match="no 'yes' and no 'no' token"):
        minibt.Reranker(no_yes)


# ------------------------------------------------------------------------------------------------------ serve

def test_serve_rerank_with_an_llm_reranker(llm):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from minibt.tools import serve
    folder, ref, hf_tok = llm
    rr = minibt.Reranker(folder)
    svc = serve.Service(rr, None, max_batch_tokens=512, max_client_batch_size=8, max_concurrent_requests=8,
                        api_key=None, auto_truncate=False, model_id="qwen3-reranker", payload_limit=serve.PAYLOAD_LIMIT)
    docs = [d for _, d in PAIRS[:len(DOCS)]]
    want = model_card_scores(ref, hf_tok, PAIRS[:len(DOCS)])
    raw_want = model_card_scores(ref, hf_tok, PAIRS[:len(DOCS)], raw=True)
    order = sorted(range(len(docs)), key=lambda i: -want[i])
    long = "paris " * 300                                        # over the 256 tokens this model takes

    async def go():
        svc.worker.start()
        out = {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.asgi()), base_url="http://t") as c:
            out["tei"] = await c.post("/rerank", json={"query": QUERY, "texts": docs, "return_text": True})
            out["raw"] = await c.post("/rerank", json={"query": QUERY, "texts": docs, "raw_scores": True})
            out["infinity"] = await c.post("/v1/rerank", json={"query": QUERY, "documents": docs, "top_n": 2,
                                                               "return_documents": True})
            out["empty_query"] = await c.post("/rerank", json={"query": "", "texts": docs})
            out["no_docs"] = await c.post("/v1/rerank", json={"query": QUERY, "documents": []})
            out["bad_doc"] = await c.post("/rerank", json={"query": QUERY, "texts": ["a", 3]})
            out["too_many"] = await c.post("/rerank", json={"query": QUERY, "texts": ["a"] * 9})
            out["too_long"] = await c.post("/rerank", json={"query": QUERY, "texts": [long]})
            out["cut"] = await c.post("/rerank", json={"query": QUERY, "texts": [long, "paris"], "truncate": True})
            out["predict"] = await c.post("/predict", json={"inputs": [QUERY, docs[0]]})
            out["embed"] = await c.post("/embed", json={"inputs": "a"})
            out["after"] = await c.post("/rerank", json={"query": QUERY, "texts": docs[:2]})
            out["info"] = await c.get("/info")
            out["tokenize"] = await c.post("/tokenize", json={"inputs": "the fox"})
        svc.worker.stop()
        return out
    out = asyncio.run(go())
    tei = out["tei"].json()
    assert out["tei"].status_code == 200 and [r["index"] for r in tei] == order
    assert max(abs(r["score"] - want[r["index"]]) for r in tei) <= 1e-4
    assert all(r["text"] == docs[r["index"]] for r in tei)
    assert max(abs(r["score"] - raw_want[r["index"]]) for r in out["raw"].json()) <= 1e-4
    inf = out["infinity"].json()
    assert [r["index"] for r in inf["results"]] == order[:2] and inf["results"][0]["document"] == docs[order[0]]
    assert abs(inf["results"][0]["relevance_score"] - want[order[0]]) <= 1e-4 and inf["model"] == "qwen3-reranker"
    assert inf["usage"]["prompt_tokens"] == sum(len(e.ids) for e in rr.encode([(QUERY, d) for d in docs]))
    for name, status, words in [("empty_query", 422, "`query`"), ("no_docs", 422, "`documents` is an empty list"),
                                ("bad_doc", 422, "`texts`"), ("too_many", 413, "--max-client-batch-size"),
                                ("too_long", 413, "256 tokens"), ("predict", 400, "an LLM reranker"),
                                ("embed", 400, "sentence-embedding")]:
        assert out[name].status_code == status and words in out[name].json()["error"], (name, out[name].json())
    cut = sorted(out["cut"].json(), key=lambda r: r["index"])
    assert np.abs(np.array([r["score"] for r in cut]) - rr.predict([(QUERY, long), (QUERY, "paris")])).max() <= 1e-5
    assert out["after"].status_code == 200 and len(out["after"].json()) == 2          # still serving
    info = out["info"].json()
    assert "reranker" in info["model_type"] and info["max_input_length"] == 256
    assert [t["text"] for t in out["tokenize"].json()[0]] == ["the", "fox"]


def test_minibt_serve_command_serves_an_llm_reranker(llm):
    """`minibt serve --model <a *ForCausalLM folder>`: the LLM reranker, chosen from the checkpoint alone."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_serve import server
    folder, ref, hf_tok = llm
    docs = [d for _, d in PAIRS[:3]]
    want = model_card_scores(ref, hf_tok, PAIRS[:3])
    with server("--model", folder) as (url, proc):
        r = httpx.post(url + "/v1/rerank", json={"query": QUERY, "documents": docs}, timeout=60)
        assert r.status_code == 200
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert max(abs(got[i] - want[i]) for i in range(3)) <= 1e-4
        assert httpx.get(url + "/info", timeout=10).json()["model_type"].keys() == {"reranker"}
