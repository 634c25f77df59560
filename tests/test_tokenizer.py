"""minibt.load_tokenizer against transformers' tokenizers: same ids, masks and type ids."""
import json
import shutil

import pytest
import torch

import minibt
from minibt.errors import InputError

TEXTS = ["Hello world!", "word " * 200, "Ünïcödé and émojis 🤗 naïve café", "", "Paris is the [MASK] of France."]


def same(ours, theirs):
    assert set(ours) == {k for k in theirs if k in ("input_ids", "attention_mask", "token_type_ids")}
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k


def test_minilm_ids_equal_transformers(minilm):
    """Its tokenizer.json pads and truncates to 128 on its own; neither may leak into our output."""
    import transformers
    ref = transformers.AutoTokenizer.from_pretrained(minilm)
    tok = minibt.load_tokenizer(minilm)
    assert json.loads((minilm / "tokenizer.json").read_text())["truncation"]["max_length"] == 128
    same(tok(TEXTS), ref(TEXTS, padding=True, return_tensors="pt"))
    same(tok(TEXTS, truncation=True, max_length=16), ref(TEXTS, padding=True, truncation=True, max_length=16,
                                                         return_tensors="pt"))
    assert tok(TEXTS)["input_ids"].shape[1] == 202                 # no truncation unless asked


def test_vocab_txt_fallback(minilm, tmp_path):
    import transformers
    shutil.copytree(minilm, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    tok = minibt.load_tokenizer(tmp_path / "m")
    ref = transformers.AutoTokenizer.from_pretrained(minilm)
    same(tok(TEXTS), ref(TEXTS, padding=True, return_tensors="pt"))


def test_byte_level_bpe_fallback(tmp_path):
    """vocab.json + merges.txt (RoBERTa layout) against transformers' RobertaTokenizer on the same files."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50 + TEXTS, vocab_size=400,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "bos_token": "<s>",
                                                                "eos_token": "</s>"}))
    ref = transformers.RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    tok = minibt.load_tokenizer(tmp_path)
    texts = ["the quick fox", "lazy dogs jump over brown foxes", "x"]
    same(tok(texts), ref(texts, padding=True, return_tensors="pt"))
    assert tok.decode(tok(["the quick fox"])["input_ids"][0]) == "the quick fox"


def test_truncation_needs_a_limit(tmp_path, minilm):
    tok = minibt.load_tokenizer(minilm)
    assert tok(["word " * 600], truncation=True)["input_ids"].shape[1] == 512     # model_max_length
    tok.model_max_length = None
    with pytest.raises(InputError, match="max_length"):
        tok(["a b"], truncation=True)


def test_opt_vocab_files_prepend_bos(tmp_path):
    """OPT repos ship vocab.json + merges.txt only; every text starts with </s> (OPT's bos), as transformers does."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "</s>", "add_bos_token": True,
        "tokenizer_class": "GPT2Tokenizer"}))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = minibt.load_tokenizer(tmp_path)
    for text in ["the quick fox", "lazy dogs jump"]:
        assert tok([text])["input_ids"][0].tolist() == ref(text)["input_ids"]
        assert tok([text])["input_ids"][0, 0] == tok.token_id("bos_token")
