"""minibt.Encoder: the sentence-transformers habit (`Model(name).encode(texts)`), same vectors."""
import numpy as np
import pytest
import torch

import minibt

TEXTS = ["A man is eating food.", "A man is eating pasta.", "The girl plays guitar.", ""]


def test_encode_equals_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer
    enc = minibt.Encoder()                                       # the bundled model: minibt.bundled_model()
    assert minibt.bundled_model() == minilm
    want = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS, batch_size=2)
    got = enc.encode(TEXTS, batch_size=2)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (4, 384)
    assert np.abs(got - want).max() < 1e-5
    one = enc.encode(TEXTS[0])                                   # a str is one text
    assert one.shape == (384,) and np.abs(one - want[0]).max() < 1e-5
    t = enc.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (4, 384)
    listed = enc.encode(TEXTS[:2], convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 2 and listed[0].shape == (384,)
    assert enc.encode([]).shape == (0, 384) and enc.get_sentence_embedding_dimension() == 384


def test_normalize_and_options(tiny, minilm, tmp_path):
    import shutil
    enc = minibt.Encoder(str(minilm), dtype="bf16", attn="sdpa")
    assert next(enc.model.parameters()).dtype == torch.bfloat16 and enc.model.attn == "sdpa"
    # the tiny random BERT has no Normalize module: normalize_embeddings=True does it
    shared, _ = tiny("BertModel", vocab_size=30522)
    folder = shutil.copytree(shared, tmp_path / "bert")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder)
    raw = minibt.Encoder(folder)
    plain = raw.encode(["some words"])
    unit = raw.encode(["some words"], normalize_embeddings=True)
    assert abs(np.linalg.norm(plain) - 1) > 1e-3 and abs(np.linalg.norm(unit) - 1) < 1e-5
    assert np.allclose(unit, plain / np.linalg.norm(plain), atol=1e-6)
    with pytest.raises(minibt.errors.InputError, match="batch_size"):
        raw.encode(["x"], batch_size=0)
    with pytest.raises(minibt.errors.InputError, match=r"texts\[0\] is a int, not a string"):
        raw.encode([1, 2])
