"""The `minibt` command on the bundled real model and on a tiny masked-LM checkpoint."""
import subprocess
import sys

import torch

import minibt


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, "-m", "minibt.tools.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_embed_similarity_on_bundled_model(minilm):
    r = run("embed", "A man is eating food.", "A man is eating pasta.", "The girl plays guitar.")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "cosine similarity" and len(lines) == 4
    sims = [[float(x) for x in line.split()[-3:]] for line in lines[1:]]
    vecs = minibt.embed(minibt.from_hub(minilm), minibt.load_tokenizer(minilm),
                        ["A man is eating food.", "A man is eating pasta.", "The girl plays guitar."])
    want = (vecs @ vecs.T).tolist()
    for got_row, want_row in zip(sims, want):
        for g, w in zip(got_row, want_row):
            assert abs(g - w) < 1e-3
    assert sims[0][1] > 0.5 > sims[0][2]


def test_fill_mask_default_model_has_no_head():
    r = run("fill-mask", "Paris is the [MASK] of France.")
    assert r.returncode == 2 and "no masked-LM head" in r.stderr and "all-MiniLM-L6-v2" in r.stderr


def test_fill_mask_on_a_masked_lm(tiny, minilm, tmp_path):
    """A tiny random BertForMaskedLM with the real MiniLM vocabulary: the printed top-1 is the argmax."""
    import shutil
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, tmp_path)
    r = run("fill-mask", "--model", str(tmp_path), "--top-k", "3", "Paris is the [MASK] of France.")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert len(rows) == 3
    model, tok = minibt.from_hub(tmp_path), minibt.load_tokenizer(tmp_path)
    batch = tok(["Paris is the [MASK] of France."])
    pos = batch["input_ids"][0].tolist().index(tok.token_id("mask_token"))
    best = model(**batch).logits[0, pos].argmax().item()
    assert rows[0].split(None, 1)[1] == f"Paris is the {tok.decode([best]).strip()} of France."


def test_bench_writes_table_and_plot(tmp_path):
    """A tiny grid of the seed experiment: every contender timed, a markdown table and a PNG written."""
    md, png = tmp_path / "bench.md", tmp_path / "bench.png"
    r = run("bench", "--model", "minilm", "--batch", "2", "--length", "16", "--padding", "0", "0.5", "--reps", "1",
            "--backends", "sdpa,varlen,fused,auto", "--with", "benchmarks.hf_contenders", "--out", str(md),
            "--plot", str(png))
    assert r.returncode == 0, r.stderr
    table = md.read_text()
    for contender in ("minibt sdpa", "minibt varlen", "minibt fused", "minibt auto", "transformers eager",
                      "transformers sdpa"):
        assert table.count(f"| {contender} |") == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2/2" in r.stderr                                                # the progress bar reached the end
    assert "speedup vs transformers sdpa" in table
    alone = run("bench", "--model", "minilm", "--batch", "2", "--length", "16", "--padding", "0.5", "--reps", "1")
    assert alone.returncode == 0 and "speedup vs minibt sdpa" in alone.stdout and "transformers" not in alone.stdout
