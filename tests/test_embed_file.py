"""Token-budget batching, and the streaming, resumable `minibt embed --file`."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import minibt
from minibt.embedding import token_batches
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
    src = corpus(tmp_path / "c.txt", n=600)
    whole, killed = tmp_path / f"whole{suffix}", tmp_path / f"killed{suffix}"
    assert cli("--file", str(src), "--out", str(whole), "--chunk", "50").wait(timeout=900) == 0
    p = cli("--file", str(src), "--out", str(killed), "--chunk", "50")
    progress = tmp_path / f"killed{suffix}.progress"
    deadline = time.time() + 600
    while time.time() < deadline:                                        # kill it mid-file, after some chunks
        if progress.exists() and json.loads(progress.read_text())["rows"] >= 150:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    rows = json.loads(progress.read_text())["rows"]
    assert 150 <= rows < 600
    r = cli("--file", str(src), "--out", str(killed), "--chunk", "50", "--resume")
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


# ------------------------------------------------------------- row i = line i, whatever the bytes; safe resume

from minibt.tools import cli as minibt_cli                                   # noqa: E402
from minibt.tools import embed_file as ef                                    # noqa: E402

RAW = (b"\xef\xbb\xbfa byte-order mark starts the file\n"
       b"a stray \r carriage return inside a line\n"
       b"a CRLF line\r\n"
       b"invalid \xff\xfe UTF-8 bytes\n"
       b"\n"
       b"\x0cform feed and \xe2\x80\xa8 line separator stay in the text\n"
       b"last line without a newline")
TEXTS = ["a byte-order mark starts the file", "a stray \r carriage return inside a line", "a CRLF line",
         "invalid \ufffd\ufffd UTF-8 bytes", "", "\x0cform feed and \u2028 line separator stay in the text",
         "last line without a newline"]


def test_row_i_is_line_i_whatever_the_bytes(minilm, tmp_path, capsys):
    """The documented rule, identical for a file and for stdin: \\n ends a line, nothing else does."""
    src = tmp_path / "odd.txt"
    src.write_bytes(RAW)
    assert ef.count_lines(src) == len(TEXTS)
    assert minibt_cli.main(["embed", "--file", str(src), "--out", str(tmp_path / "f.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "1 line(s) had invalid UTF-8 (first: line 4)" in err and "100%" in err and "7/7 lines" in err
    p = cli("--file", "-", "--out", str(tmp_path / "s.jsonl"), stdin=open(src, "rb"))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert "%" not in p.stderr.read().split("line(s)")[0]                    # stdin: no total, rate only
    from_file = [json.loads(x) for x in (tmp_path / "f.jsonl").read_text().splitlines()]
    from_stdin = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["row"] for r in from_file] == list(range(len(TEXTS)))
    want = minibt.embed(minibt.from_hub(minilm), minibt.load_tokenizer(minilm), TEXTS).numpy()
    for rows in (from_file, from_stdin):
        assert np.abs(np.array([r["vector"] for r in rows]) - want).max() < 1e-5


def test_chunk_zero_is_refused(minilm, tmp_path):
    src = corpus(tmp_path / "c.txt", n=3)
    p = cli("--file", str(src), "--out", str(tmp_path / "v.npy"), "--chunk", "0")
    assert p.wait(timeout=120) == 2 and "--chunk: must be >= 1, got 0" in p.stderr.read()
    with pytest.raises(InputError, match="chunk=0"):
        ef.embed_file(None, None, str(src), tmp_path / "w.npy", chunk=0)


def interrupted(minilm, tmp_path, monkeypatch, capsys, suffix=".npy", fail_at=3):
    """A run stopped by a full disk in its `fail_at`-th data write, half of that write on disk."""
    src = corpus(tmp_path / "c.txt", n=150)
    out = tmp_path / f"v{suffix}"
    calls = {"n": 0}

    class DiskFillsUp:
        """The real output file, but its `fail_at`-th data write stops half way on a full disk."""

        def __init__(self, file):
            self.file = file

        def __getattr__(self, name):
            return getattr(self.file, name)

        def write(self, data):
            calls["n"] += 1
            if calls["n"] == fail_at + 1:                            # +1: the header write comes first
                self.file.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

    def create_out(path, *args, **kw):                               # embed_file's exclusive create of `out`
        f = create_new(path, *args, **kw)
        return DiskFillsUp(f) if Path(path) == out else f
    from minibt.outputs import create_new
    with monkeypatch.context() as m:
        m.setattr(ef, "create_new", create_out)
        assert minibt_cli.main(["embed", "--file", str(src), "--out", str(out), "--chunk", "32"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full (ENOSPC)" in err and "first 64 rows are safely on disk" in err and "--resume" in err
    return src, out


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_disk_full_then_resume_gives_the_whole_file(minilm, tmp_path, monkeypatch, capsys, suffix):
    src, out = interrupted(minilm, tmp_path, monkeypatch, capsys, suffix)
    whole = tmp_path / f"whole{suffix}"
    assert minibt_cli.main(["embed", "--file", str(src), "--out", str(whole), "--chunk", "32"]) == 0
    assert minibt_cli.main(["embed", "--file", str(src), "--out", str(out), "--chunk", "32", "--resume"]) == 0
    assert out.read_bytes() == whole.read_bytes()
    assert not (tmp_path / f"v{suffix}.progress").exists()


def test_resume_refuses_another_model_an_edited_input_or_a_short_output(minilm, tmp_path, monkeypatch, capsys):
    src, out = interrupted(minilm, tmp_path, monkeypatch, capsys)
    resume = ["embed", "--file", str(src), "--out", str(out), "--chunk", "32", "--resume"]
    # another model of the same width: the bundled MiniLM with one middle-layer weight changed
    model, tok = minibt.from_hub(minilm), minibt.load_tokenizer(minilm)
    with torch.no_grad():
        model.layers[3].state_dict()[next(iter(model.layers[3].state_dict()))].mul_(1.01)
    with pytest.raises(InputError, match="another model"):
        ef.embed_file(model, tok, str(src), out, resume=True, chunk=32)
    assert minibt_cli.main([*resume, "--dtype", "bf16"]) == 2 and "another model" in capsys.readouterr().err
    # an edited input: one character of a line already embedded
    original = src.read_bytes()
    src.write_bytes(original.replace(b"a", b"A", 1))
    assert minibt_cli.main(resume) == 2 and "the input changed" in capsys.readouterr().err
    src.write_bytes(original)
    # a partial output shorter than its progress record
    data = out.read_bytes()
    out.write_bytes(data[:200])
    assert minibt_cli.main(resume) == 2 and "shorter than the" in capsys.readouterr().err
    # long enough, but a byte of the committed rows changed
    state = json.loads((tmp_path / "v.npy.progress").read_text())
    bad = bytearray(data)
    bad[state["bytes"] - 4] ^= 0xFF
    out.write_bytes(bytes(bad))
    assert minibt_cli.main(resume) == 2 and "not what this run wrote" in capsys.readouterr().err
    out.write_bytes(data)
    assert minibt_cli.main(resume) == 0
    want = minibt.embed(minibt.from_hub(minilm), tok, src.read_text().split("\n")[:-1]).numpy()
    assert np.abs(np.load(out) - want).max() < 1e-5


@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=30), st.booleans())
def test_line_rule_keeps_one_row_per_line(lines, trailing_newline):
    """Whatever the bytes (\r, invalid UTF-8, U+2028...), the reader yields exactly one text per b"\n"-line, in
    order, as many as the progress bar's total counts, and hashes exactly the bytes it consumed."""
    import hashlib
    import io
    import tempfile
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    want = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    reader = ef.Lines(io.BytesIO(data))
    texts = reader.take(10**6)
    assert len(texts) == want
    assert reader.bytes == len(data) and reader.sha.hexdigest() == hashlib.sha256(data).hexdigest()
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        assert ef.count_lines(Path(f.name)) == want
    segments = data.split(b"\n")[:want]
    for i, text in enumerate(texts):
        raw = segments[i][:-1] if segments[i].endswith(b"\r") else segments[i]
        raw = raw[3:] if i == 0 and raw.startswith(b"\xef\xbb\xbf") else raw
        assert text == raw.decode("utf-8", errors="replace")
