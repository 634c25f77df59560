"""Today's embedders at their real layer shapes: minibt.Encoder vs sentence-transformers encode, same weights and
texts, one run.

Real ModernBERT-base and Qwen3-Embedding-0.6B weights cannot be downloaded here, so each model is random weights at
the real model's layer shapes (Qwen3: fewer layers, said in the table), saved by transformers and wrapped by
sentence-transformers itself (ModernBERT: mean pooling + Normalize; Qwen3: last-token pooling + Normalize, the query
instruction prompt). Tokenizer: all-MiniLM-L6-v2's WordPiece (its ids fit both vocabularies), so token counts are
those of real English text. Corpus: the tests' real text (Python standard library docstring paragraphs, 3-200 words).
fp32, 2 threads; the vectors of both are compared (max abs diff) before any time is reported.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _report import table, test_module, write_section

SHAPES = {
    "ModernBERT-base": ("ModernBertModel", "ModernBertConfig", dict(
        hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12, vocab_size=50368,
        max_position_embeddings=8192, global_attn_every_n_layers=3, local_attention=128, pad_token_id=0,
        bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102), "mean", None),
    "Qwen3-Embedding-0.6B": ("Qwen3Model", "Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        vocab_size=151669, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True),
        "lasttoken", "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"),
}


def build(name, layers, root: Path, minilm: Path):
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    arch, cfg_name, kw, pooling, prompt = SHAPES[name]
    if layers:
        kw = dict(kw, num_hidden_layers=layers)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(getattr(transformers, cfg_name)(**kw)).eval()
    src = root / f"{name}-src"
    model.save_pretrained(src, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / f, src)
    params = sum(p.numel() for p in model.parameters())
    del model
    st = SentenceTransformer(modules=[Transformer(str(src), max_seq_length=512), Pooling(kw["hidden_size"], pooling),
                                      Normalize()], prompts={"query": prompt} if prompt else None, device="cpu")
    st.save(str(root / name))
    return root / name, params, kw["num_hidden_layers"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="texts of the corpus")
    ap.add_argument("--qwen-layers", type=int, default=8, help="of Qwen3-0.6B's 28 (memory and time on 2 cores)")
    args = ap.parse_args()
    import minibt
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(2)
    texts = test_module("real_corpus").stdlib_corpus(args.n, 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SHAPES:
            layers = args.qwen_layers if name.startswith("Qwen3") else None
            folder, params, n_layers = build(name, layers, Path(tmp), minibt.bundled_model())
            enc = minibt.Encoder(folder)
            st = SentenceTransformer(str(folder), device="cpu")
            runs = {"minibt": lambda: enc.encode_query(texts, batch_size=32),
                    "sentence-transformers": lambda: st.encode_query(texts, batch_size=32)}
            enc.encode_query(texts[:16]), st.encode_query(texts[:16])      # warm-up on a slice
            seconds, out = {}, {}
            for label, fn in runs.items():
                start = time.perf_counter()
                out[label] = fn()
                seconds[label] = time.perf_counter() - start
            diff = float(np.abs(out["minibt"] - out["sentence-transformers"]).max())
            tokens = sum(len(e.ids) for e in enc.tokenizer.encode(texts, truncation=True, max_length=512))
            rows.append([f"{name} ({n_layers} layers)", f"{params / 1e6:.0f}M", enc.pipeline.pooling,
                         f"{len(texts) / seconds['minibt']:.1f}", f"{len(texts) / seconds['sentence-transformers']:.1f}",
                         f"{seconds['sentence-transformers'] / seconds['minibt']:.2f}x", f"{diff:.1e}", tokens])
            print(rows[-1], flush=True)
            del enc, st
    body = ("Random weights at each real model's layer shapes (Qwen3 with fewer layers), wrapped by "
            "sentence-transformers itself; the same " + str(args.n) + " real-text paragraphs, encode_query (Qwen3: "
            "its instruction prompt), batch_size 32, fp32, one timed pass after a warm-up. Goal: minibt >= 1.5x.\n\n"
            + table(["model (shapes of)", "params", "pooling", "texts/s minibt", "sentence-transformers", "ratio",
                     "max abs diff", "tokens"], rows))
    write_section("embed_shapes", body)


if __name__ == "__main__":
    main()
