"""Token-budget batching, and the streaming, resumable `minibt embed --file`."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minibt
from minibt.embed import token_batches
from minibt.errors import InputError


@given(st.lists(st.integers(1, 256), max_size=300), st.sampled_from([256, 512, 4096]),
       st.sampled_from([None, 1, 7]))
def test_batches_never_exceed_the_budget(lengths, budget, size):
    seen = []
    for batch in token_batches(lengths, budget, size):
        assert len(batch) * max(lengths[i] for i in batch) <= budget
        assert size is None or len(batch) <= size
        seen += batch
    assert sorted(seen) == list(range(len(lengths)))


def corpus(path, n=1200, seed=0):
    rng = np.random.default_rng(seed)
    words = "attention is all you need but padding is not free on a cpu".split()
    with open(path, "w") as f:
        for i in range(n):
            k = int(rng.choice([0, 1, 5, 20, 60, 400]))     # empty lines and over-long texts included
            f.write(" ".join(rng.choice(words, k)) + "\n")
    return path


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "minibt.tools.cli", "embed", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_file_to_npy_equals_embed_in_memory(minilm, tmp_path):
    src = corpus(tmp_path / "c.txt", n=300)
    out = tmp_path / "v.npy"
    p = cli("--file", str(src), "--out", str(out), "--chunk", "64")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    got = np.load(out)
    lines = src.read_text().split("\n")[:-1]
    want = minibt.embed(minibt.from_hub(minilm), minibt.load_tokenizer(minilm), lines).numpy()
    assert got.shape == (300, 384) and np.abs(got - want).max() < 1e-5
    assert not (tmp_path / "v.npy.progress").exists()
    p = cli("--file", str(src), "--out", str(out))                       # never overwrites finished work
    assert p.wait(timeout=600) == 2 and "exists" in p.stderr.read()


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_resume_after_kill_gives_the_same_file(minilm, tmp_path, suffix):
    src = corpus(tmp_path / "c.txt")
    whole, killed = tmp_path / f"whole{suffix}", tmp_path / f"killed{suffix}"
    assert cli("--file", str(src), "--out", str(whole), "--chunk", "100").wait(timeout=900) == 0
    p = cli("--file", str(src), "--out", str(killed), "--chunk", "100")
    progress = tmp_path / f"killed{suffix}.progress"
    deadline = time.time() + 600
    while time.time() < deadline:                                        # kill it mid-file, after some chunks
        if progress.exists() and json.loads(progress.read_text())["rows"] >= 300:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    rows = json.loads(progress.read_text())["rows"]
    assert 300 <= rows < 1200
    r = cli("--file", str(src), "--out", str(killed), "--chunk", "100", "--resume")
    assert r.wait(timeout=900) == 0, r.stderr.read()
    assert killed.read_bytes() == whole.read_bytes()
    assert not progress.exists()


def test_stdin_and_resume_guards(minilm, tmp_path):
    src = corpus(tmp_path / "c.txt", n=50)
    out = tmp_path / "v.jsonl"
    p = cli("--file", "-", "--out", str(out), stdin=open(src))
    assert p.wait(timeout=600) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(50)) and len(rows[0]["vector"]) == 384
    with pytest.raises(InputError, match="complete"):
        from minibt.tools.embed_file import Writer
        Writer(out, 384, "<stdin>", resume=True)
    with pytest.raises(InputError, match=".npy or .jsonl"):
        Writer(tmp_path / "v.txt", 384, "<stdin>", resume=False)
