"""minibt.ray_data (minibt/tools/ray.py) on a real local Ray cluster: the vectors of minibt.embed, every row exactly
once, errors before work.

One local cluster (`ray.init(num_cpus=2)`) serves the module; the two-node test starts its own with `ray start`
(a head and a second node with its own temp folder, both on this machine) and stops every process it started."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

ray = pytest.importorskip("ray")
import pyarrow as pa                                           # noqa: E402  (ray[data] brings it)
import pyarrow.parquet as pq                                   # noqa: E402

import minibt                                                  # noqa: E402
from minibt.errors import CheckpointError, InputError          # noqa: E402
from minibt.tools import ray as mray                           # noqa: E402
from minibt.tools.lines import split                           # noqa: E402


def real_texts(n: int) -> list[str]:
    """Paragraphs of a few standard-library docstrings (real prose and code talk), plus an empty text and one
    past MiniLM's 256-token limit (truncated, as minibt.embed does)."""
    out = []
    for name in ("argparse", "json", "pathlib", "subprocess", "typing", "functools", "logging", "socket",
                 "tarfile", "zipfile", "email.message", "asyncio.tasks"):
        path = Path(importlib.util.find_spec(name).origin)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                out += [" ".join(p.split()) for p in (ast.get_docstring(node) or "").split("\n\n") if p.strip()]
    out = out[:n - 2] + ["", " ".join(out[:200])]
    assert len(out) == n
    return out


@pytest.fixture(scope="module")
def cluster():
    mray.keep_on_loopback()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(minilm):
    """texts -> minibt.embed vectors in this process (the plain path the cluster must reproduce)."""
    model, tok = minibt.from_hub(minilm), minibt.load_tokenizer(minilm)
    return lambda texts: minibt.embed(model, tok, texts).numpy()


def corpus_file(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


def read_shards(out: Path) -> pa.Table:
    files = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")


def test_embed_dataset_equals_embed_row_by_id(cluster, minilm, reference):
    texts = real_texts(300)
    ids = np.random.default_rng(0).permutation(10_000)[:300]                 # ids are not positions
    ds = ray.data.from_items([{"doc": int(i), "text": t, "source": f"s{i % 3}"} for i, t in zip(ids, texts)])
    got = mray.embed_dataset(ds, str(minilm), actors=1, batch_size=64).to_arrow_refs()
    table = pa.concat_tables(ray.get(got))
    assert table.column_names == ["doc", "text", "source", "embedding"]                    # every column kept
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)            # fixed-size float32
    assert table.num_rows == 300 and sorted(table["doc"].to_pylist()) == sorted(ids.tolist())
    want = dict(zip(ids.tolist(), reference(texts)))
    vecs = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    for doc, text, source, vec in zip(table["doc"].to_pylist(), table["text"].to_pylist(),
                                      table["source"].to_pylist(), vecs):
        assert texts[ids.tolist().index(doc)] == text and source == f"s{doc % 3}"
        assert np.abs(vec - want[doc]).max() < 1e-5, doc


def embed_command(argv: list[str]):
    """`minibt embed ...` parsed by the real command's parser with the Ray flags added, as the CLI wires them."""
    from minibt.tools.cli import parser
    from minibt.tools.ray_command import add_arguments
    p = parser()
    embed = next(a for a in p._subparsers._group_actions if "embed" in a.choices).choices["embed"]
    if not any("--ray" in a.option_strings for a in embed._actions):   # the lead's cli may have wired it already
        add_arguments(embed)
    return p.parse_args(["embed", *argv])


def test_corpus_to_shards_then_resume(cluster, minilm, reference, tmp_path, capsys):
    from minibt.tools.ray_command import run
    texts = real_texts(250)
    src = corpus_file(tmp_path / "corpus.txt", texts)
    out = tmp_path / "out"
    s = run(embed_command(["--ray", "--file", str(src), "--out", str(out), "--shard-rows", "60", "--with-text",
                           "--model", str(minilm), "--actors", "2"]))
    assert (s["rows"], s["embedded"], s["shards_written"], s["shards_skipped"]) == (250, 250, 5, 0)
    printed = capsys.readouterr()
    assert "250 vectors -> " in printed.out and "250/250 lines" in printed.err    # result line, progress bar
    table = read_shards(out)
    assert table["id"].to_pylist() == list(range(250)) and table["text"].to_pylist() == texts
    vecs = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert np.abs(vecs - reference(texts)).max() < 1e-5
    with pytest.raises(InputError, match="--resume"):                        # never overwrites a run
        mray.embed_corpus([src], out, str(minilm), shard_rows=60, keep_text=True, progress=False)
    with pytest.raises(InputError, match="shard_rows"):                      # nor mixes two plans
        mray.embed_corpus([src], out, str(minilm), shard_rows=50, keep_text=True, resume=True, progress=False)
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet")}
    (out / "part-00002.parquet").unlink()                                    # as if the run died there
    s = mray.embed_corpus([src], out, str(minilm), shard_rows=60, keep_text=True, resume=True, progress=False)
    assert (s["embedded"], s["shards_written"], s["shards_skipped"]) == (60, 1, 4)
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("part-*.parquet")}
    assert {k for k in after if after[k] != before.get(k)} == {"part-00002.parquet"}   # only that one redone
    assert read_shards(out).equals(table)


def test_resume_refuses_what_embed_file_refuses(cluster, minilm, tmp_path):
    """--resume on Ray checks what `embed --file --resume` checks: the model and its dtype, the input's content (an
    edit that keeps the size), each shard's ids against its name; --out faults are one typed error each. Every refusal
    leaves the finished shards as they were."""
    texts = real_texts(30)
    src = corpus_file(tmp_path / "corpus.txt", texts)
    out = tmp_path / "out"
    run = dict(shard_rows=10, actors=1, progress=False)
    assert mray.embed_corpus([src], out, str(minilm), **run)["shards_written"] == 3
    shards = {f.name: f.read_bytes() for f in out.glob("part-*.parquet")}

    def unchanged():
        return {f.name: f.read_bytes() for f in out.glob("part-*.parquet")} == shards

    with pytest.raises(InputError, match="dtype.*float32.*bfloat16"):                # fp32 and bf16 rows never mixed
        mray.embed_corpus([src], out, str(minilm), resume=True, dtype="bfloat16", **run)
    data = src.read_bytes()
    edited = data.replace(texts[4].encode(), texts[4].encode().swapcase(), 1)
    assert len(edited) == len(data) and edited != data
    src.write_bytes(edited)                                                        # same size, other content
    with pytest.raises(InputError, match=r"_minibt.json: .*input \(paths, sizes or content\)"):
        mray.embed_corpus([src], out, str(minilm), resume=True, **run)
    src.write_bytes(data)
    assert unchanged()
    stray = out / "part-00001.parquet"
    stray.write_bytes(shards["part-00000.parquet"])                                # ids 0..9 under shard 1's name
    with pytest.raises(InputError, match=r"part-00001.parquet: holds ids 0..9 \(10 rows\), not ids 10..19"):
        mray.embed_corpus([src], out, str(minilm), resume=True, **run)
    stray.write_bytes(b"PAR1 not parquet")
    with pytest.raises(InputError, match="part-00001.parquet: not a readable shard"):
        mray.embed_corpus([src], out, str(minilm), resume=True, **run)
    stray.write_bytes(shards["part-00001.parquet"])
    s = mray.embed_corpus([src], out, str(minilm), resume=True, **run)              # intact: nothing to redo
    assert (s["shards_skipped"], s["embedded"]) == (3, 0) and unchanged()

    (out / "_minibt.json").write_text('{"sources": [')                              # damaged manifest
    with pytest.raises(InputError, match="_minibt.json: not valid JSON"):
        mray.embed_corpus([src], out, str(minilm), resume=True, **run)
    (out / "_minibt.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="_minibt.json: must hold a JSON object"):
        mray.embed_corpus([src], out, str(minilm), resume=True, **run)
    assert unchanged()
    afile = corpus_file(tmp_path / "afile", ["x"])
    with pytest.raises(InputError, match="afile: is a file"):                      # --out naming a file
        mray.embed_corpus([src], afile, str(minilm), **run)
    with pytest.raises(InputError, match="afile/sub: cannot write there"):          # a place no folder can be made
        mray.embed_corpus([src], afile / "sub", str(minilm), **run)
    assert afile.read_text() == "x\n"


def test_an_address_with_no_cluster_fails_fast(tmp_path):
    """`embed --ray HOST:PORT` with nothing listening: one MinibtError naming the address within the timeout, before
    the model loads or --out is made (ray.init would wait on it without end)."""
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(minibt.MinibtError, match=f"--ray 127.0.0.1:{port}: no Ray cluster answers there"):
        mray.check_address(f"127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - start < 5
    src = corpus_file(tmp_path / "c.txt", ["a"])
    code = (f"import sys; from minibt.tools import cli; sys.exit(cli.main(['embed', '--ray', '127.0.0.1:{port}', "
            f"'--file', {str(src)!r}, '--out', {str(tmp_path / 'o')!r}, '--model', 'no-such-model-loaded']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"minibt: error: --ray 127.0.0.1:{port}: no Ray cluster answers there (Connection refused); start one with "
        "`ray start --head`, or give its HOST:PORT"], r.stderr
    assert not (tmp_path / "o").exists()


def crash_once(monkeypatch, actor: type, marker: Path, after_temp_file: bool = False) -> None:
    """Ray Data runs minibt's actor class `actor` as a subclass whose process exits as a crash would, once in the
    whole run (the first process to create `marker`): after a batch's work and before its answer, or with
    `after_temp_file`, when a shard's temporary file is written and not yet renamed (pyarrow's real write_table
    patched in that actor). The subclass goes in through Ray's real `Dataset.map_batches`, so minibt's own names stay
    untouched; it is built in this function so that cloudpickle ships it to the actors by value (Ray's workers do
    not import this test module)."""
    def die():
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))      # atomic: one process, one time
        except FileExistsError:
            return
        os._exit(1)

    write = pq.write_table

    def write_then_die(*args, **kw):
        write(*args, **kw)
        die()

    class DiesOnce(actor):
        def __call__(self, batch):
            if after_temp_file:
                with mock.patch.object(pq, "write_table", write_then_die):
                    return super().__call__(batch)
            out = super().__call__(batch)
            die()
            return out

    map_batches = ray.data.Dataset.map_batches
    monkeypatch.setattr(ray.data.Dataset, "map_batches",
                        lambda self, fn, *args, **kw: map_batches(self, DiesOnce if fn is actor else fn, *args, **kw))


def test_actor_killed_mid_batch_every_row_once(cluster, minilm, reference, tmp_path, monkeypatch):
    texts = real_texts(240)
    marker = tmp_path / "crashed"
    src = corpus_file(tmp_path / "corpus.txt", texts)
    crash_once(monkeypatch, mray.ShardWriter, marker, after_temp_file=True)
    s = mray.embed_corpus([src], tmp_path / "out", str(minilm), shard_rows=40, progress=False, actors=2)
    assert marker.exists()                                 # an actor died after writing a shard's temp file
    assert s["embedded"] == 240 and s["shards_written"] == 6
    table = read_shards(tmp_path / "out")
    assert table["id"].to_pylist() == list(range(240))     # complete, no duplicates
    assert not list((tmp_path / "out").glob(".*tmp"))      # the dead actor's half-written file is gone
    assert np.abs(np.stack(table["embedding"].to_numpy(zero_copy_only=False)) - reference(texts)).max() < 1e-5

    marker2 = tmp_path / "crashed-dataset"                 # the same through embed_dataset's batches
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    crash_once(monkeypatch, mray.Embedder, marker2)
    got = pa.concat_tables(ray.get(mray.embed_dataset(ds, str(minilm), actors=1, batch_size=40).to_arrow_refs()))
    assert marker2.exists()
    assert sorted(got["id"].to_pylist()) == list(range(240))


def test_bad_input_fails_before_any_work(cluster, minilm, tmp_path):
    ds = ray.data.from_items([{"id": 1, "body": "a"}])
    with pytest.raises(InputError, match="column 'text' is not in the dataset.*id, body"):
        mray.embed_dataset(ds, str(minilm))
    with pytest.raises(InputError, match="'text' holds int64, not strings"):
        mray.embed_dataset(ray.data.from_items([{"text": 1}, {"text": 2}]), str(minilm))
    with pytest.raises(InputError, match="1 null rows"):
        mray.embed_dataset(ray.data.from_items([{"text": "a"}, {"text": None}]), str(minilm))
    with pytest.raises(InputError, match="already has an 'embedding'"):
        mray.embed_dataset(ray.data.from_items([{"text": "a", "embedding": 1}]), str(minilm))
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model"):
        mray.embed_dataset(ray.data.from_items([{"text": "a"}]), "no-such-org/no-such-model")
    with pytest.raises(CheckpointError):
        mray.embed_corpus([corpus_file(tmp_path / "ok.txt", ["a"])], tmp_path / "o2", str(tmp_path / "nothing"))
    assert not (tmp_path / "o2").exists()                                    # nothing started


def test_lines_follow_embed_file_rule(tmp_path):
    """Row i = line i whatever the bytes: lines end at \\n only, one \\r before it dropped, bad UTF-8 -> U+FFFD."""
    data = b"crlf\r\nkeeps\r\r\n\xff\xfe bad\n\nform\x0cfeed\xe2\x80\xa8x\nlast"
    (tmp_path / "c.txt").write_bytes(data)
    shards, invalid, first = mray.plan_shards([tmp_path / "c.txt"], 2)
    assert [(s["first_id"], s["rows"]) for s in shards] == [(0, 2), (2, 2), (4, 2)]
    assert (invalid, first) == (1, f"{tmp_path / 'c.txt'} line 3")
    got = [line for s in shards for line in split(data[s["start"]:s["end"]], at_start=s["start"] == 0)]
    assert got == ["crlf", "keeps\r", "\ufffd\ufffd bad", "", "form\x0cfeed\u2028x", "last"]


def test_a_line_over_the_limit_is_refused_when_shards_are_planned(tmp_path):
    """The line reader's cap holds for --ray too: the driver's plan refuses the line, naming the file and line."""
    from minibt.tools.lines import MAX_LINE_BYTES
    src = tmp_path / "c.txt"
    src.write_bytes(b"ok\n" + b"z" * (MAX_LINE_BYTES + 1) + b"\n")
    with pytest.raises(InputError, match=f"{src} line 2: longer than {MAX_LINE_BYTES} bytes"):
        mray.plan_shards([src], 2)


def test_file_and_ray_read_the_same_rows(cluster, minilm, tmp_path, monkeypatch):
    """One line rule for `embed --file` and `embed --ray`: the same bytes (a byte-order mark, CRLF, a stray \\r,
    invalid UTF-8, an empty line, no final newline) give the same texts, row for row and vector for vector."""
    from minibt.tools import cli, embed_file
    data = b"\xef\xbb\xbfa byte-order mark first\r\na stray \r inside\n\xff\xfe bad\n\nlast"
    texts = ["a byte-order mark first", "a stray \r inside", "\ufffd\ufffd bad", "", "last"]
    src = tmp_path / "c.txt"
    src.write_bytes(data)
    seen = []                                              # what `--file` embeds (sorted by length per piece)

    def embed(model, tok, piece, **kw):
        seen.extend(piece)
        return minibt.embed(model, tok, piece, **kw)
    monkeypatch.setattr(embed_file, "embed", embed)
    model = ["--model", str(minilm)]
    assert cli.main(["embed", "--file", str(src), "--out", str(tmp_path / "f.jsonl"), *model]) == 0
    assert cli.main(["embed", "--ray", "--file", str(src), "--out", str(tmp_path / "r"), "--with-text",
                     "--shard-rows", "2", "--actors", "1", *model]) == 0
    table = read_shards(tmp_path / "r")
    assert table["text"].to_pylist() == texts and sorted(seen) == sorted(texts)
    from_file = np.array([json.loads(line)["vector"] for line in (tmp_path / "f.jsonl").read_text().splitlines()])
    assert np.abs(np.stack(table["embedding"].to_numpy(zero_copy_only=False)) - from_file).max() < 1e-5


def test_command_flags(minilm, tmp_path):
    from minibt.tools.ray_command import run
    args = embed_command(["--ray", "--dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert args.ray == "" and args.dir == str(tmp_path) and args.shard_rows == 4096
    with pytest.raises(InputError, match="no \\*.txt files"):
        run(args)
    assert embed_command(["--ray", "10.0.0.1:6379", "--file", "c.txt", "--out", "o"]).ray == "10.0.0.1:6379"
    with pytest.raises(minibt.MinibtError, match="not stdin"):
        run(embed_command(["--ray", "--file", "-", "--out", "o"]))
    with pytest.raises(minibt.MinibtError, match="one of --file"):
        run(embed_command(["--ray", "--out", "o"]))
    assert embed_command(["some text"]).ray is None                          # plain embed is untouched


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIVER = """
import json, sys, ray
from minibt.tools.ray import embed_corpus
s = embed_corpus([sys.argv[2]], sys.argv[3], sys.argv[4], address=sys.argv[1], actors=2, shard_rows=25,
                 progress=False)
print(json.dumps({"summary": s, "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}))
"""


def test_two_node_cluster_both_nodes_work(minilm, reference, tmp_path):
    """A head and a second node (own temp folder) on this machine, one CPU each, so one actor lands on each.
    Token auth stays on, with a token file of our own; loopback addresses only."""
    token = tmp_path / "token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              f"--dashboard-agent-listen-port={_free_port()}"]
    # Ray's unix sockets live under the temp folder and must fit in 107 bytes: pytest's tmp_path is too deep
    temp = Path(tempfile.mkdtemp(prefix="ray2n"))
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("head", "second")}
    nodes = []
    try:
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "minibt.tools.ray", "start", "--head", f"--port={port}", f"--temp-dir={temp / 'head'}", "--include-dashboard=false",
             *common], env=env, start_new_session=True, stdout=logs["head"], stderr=subprocess.STDOUT))
        _wait_for_nodes(address, 1, env, tmp_path / "head.log")
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "minibt.tools.ray", "start", f"--address={address}", f"--temp-dir={temp / 'second'}", *common], env=env,
            start_new_session=True, stdout=logs["second"], stderr=subprocess.STDOUT))
        _wait_for_nodes(address, 2, env, tmp_path / "second.log")
        texts = real_texts(200)
        src = corpus_file(tmp_path / "corpus.txt", texts)
        run = subprocess.run([sys.executable, "-c", DRIVER, address, str(src), str(tmp_path / "out"), str(minilm)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        worked = result["summary"]["nodes"]
        assert len(result["nodes"]) == 2 and set(worked) == set(result["nodes"])    # both nodes embedded
        assert all(rows > 0 for rows in worked.values()) and sum(worked.values()) == 200
        table = read_shards(tmp_path / "out")
        assert table["id"].to_pylist() == list(range(200))
        assert np.abs(np.stack(table["embedding"].to_numpy(zero_copy_only=False)) - reference(texts)).max() < 1e-5
    finally:
        for p in reversed(nodes):                       # SIGTERM: `ray start --block` stops what it started
            p.terminate()
        for p in nodes:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)        # anything of that node still alive (its own group only)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, env: dict, log: Path, timeout: float = 90) -> None:
    """`ray status` lists the active nodes (the state API would need the dashboard, which stays off)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run([sys.executable, "-m", "minibt.tools.ray", "status", "--address", address], env=env, capture_output=True, text=True)
        active = r.stdout.split("Active:")[-1].split("Pending:")[0] if "Active:" in r.stdout else ""
        if active.count("node_") >= n:
            return
        time.sleep(1)
    raise AssertionError(f"the cluster at {address} did not reach {n} nodes in {timeout} s:\n{log.read_text()[-3000:]}")


def test_import_minibt_does_not_import_ray():
    code = ("import sys, minibt, minibt.embedding, minibt.tools.cli, minibt.tools.ray_command\n"
            "assert 'ray' not in sys.modules and 'pyarrow' not in sys.modules\n"
            "import minibt.ray_data; print(minibt.ray_data.embed_dataset)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "embed_dataset" in r.stdout, r.stderr


def test_without_the_extra_the_command_says_what_to_install():
    code = ("import sys; sys.modules['ray'] = None\n"            # as if ray were not installed
            "import argparse, minibt.tools.ray as m, minibt.tools.ray_command as c\n"
            "p = argparse.ArgumentParser(); c.add_arguments(p)\n"   # the CLI can still build its parser
            "try:\n    m.embed_dataset(None, 'x')\nexcept minibt.MinibtError as e:\n    print('A', e)\n"
            "try:\n    import minibt.ray_data\nexcept ImportError as e:\n    print('B', e)\n")
    r = subprocess.run([sys.executable, "-c", "import minibt\n" + code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("pip install 'minibt[ray]'") == 2, r.stdout
