"""minibt on a Ray cluster (extra `minibt[ray]`): the same vectors as `minibt.embed`, every row exactly once.

Two entry points, both Ray Data `map_batches` over a fixed pool of actors that each load the model once:

- `embed_dataset(ds, model, column="text")`: any Ray Dataset in, the same Dataset out with a fixed-size float32
  `embedding` column added (every other column kept). Rows travel through the object store; the caller writes
  the result (`.write_parquet(...)`) or consumes it.
- `embed_corpus(...)` (`minibt embed --ray`): text files in, Parquet shards out. The corpus is cut into shards of
  `shard_rows` lines by byte offset on the driver; one actor call reads its shard's bytes, embeds them and writes
  `part-NNNNN.parquet` itself (temporary name, then an atomic rename), so texts and vectors never cross the object
  store and a finished shard is a whole file. A retried shard (its actor died) rewrites the same file with the same
  rows, so the output holds every line exactly once; `--resume` skips the shards already on disk. Input and output
  paths must be visible at the same path on every node (one machine, NFS, a mounted bucket).

Ray Data restarts a dead actor and retries its batch (its defaults for actor pools: max_restarts=-1,
max_task_retries=-1; Ray 2.60 deprecates passing them, so an input that kills its process every time is retried
without end: watch the log for repeated actor deaths). Everything that can be checked cheaply is
checked on the driver before any actor starts: the model loads, the column exists and holds strings, the files
exist. Lines follow `embed --file`'s rule, the one in minibt/tools/lines.py: row i is line i whatever the bytes
(a byte-order mark starting a file dropped, invalid UTF-8 as U+FFFD, reported).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from ..config import loads, read_json
from ..errors import InputError, MinibtError
from .embed_file import model_fingerprint
from .lines import Lines, split
from .progress import Progress

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import ray.data
except ImportError as e:        # `minibt embed --help` works without the extra; using --ray then says what to add
    ray = None
    MISSING = f"the Ray extra is not installed ({e}): pip install 'minibt[ray]'"

MANIFEST = "_minibt.json"


# ---------------------------------------------------------------------------------------------- the actors

class Embedder:
    """A `map_batches` callable: the model is loaded once per actor, each batch (a pyarrow Table) comes back with an
    `embedding` column."""

    def __init__(self, model: str, *, attn: str = "auto", dtype=None, column: str = "text", batch_tokens: int | None = None):
        import torch
        import minibt
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))           # the CPUs Ray gave this actor, not the whole node's
        self.model = minibt.from_hub(model, attn=attn, dtype=dtype, head="base")
        self.tok = minibt.load_tokenizer(model)
        self.column, self.batch_tokens = column, batch_tokens
        from ..embedding import Pipeline
        self.pipeline = Pipeline.read(self.model.source, self.model.config.hidden_size)   # read once, not per batch
        self.node = ray.get_runtime_context().get_node_id()

    def vectors(self, texts: list[str]) -> pa.FixedSizeListArray:
        from ..embedding import embed
        vecs = embed(self.model, self.tok, texts, batch_tokens=self.batch_tokens, pipeline=self.pipeline).numpy()
        return pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.column)
        if texts.null_count:                  # embed_dataset counted nulls already; this guards other callers
            raise InputError(f"column {self.column!r}: {texts.null_count} null rows in a batch")
        return batch.append_column("embedding", self.vectors(texts.to_pylist()))


class ShardWriter(Embedder):
    """One call = one shard: read its lines from the source by byte range, embed, write part-NNNNN.parquet."""

    def __init__(self, model: str, *, out: str, keep_text: bool, run: str = "", **kw):
        super().__init__(model, **kw)
        self.out, self.keep_text, self.run = Path(out), keep_text, run

    def __call__(self, batch: dict) -> dict:
        rows = []
        for shard, path, start, end, first_id, count in zip(*(batch[k] for k in SHARD_FIELDS)):
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                f.seek(int(start))
                texts = split(f.read(int(end) - int(start)), at_start=int(start) == 0, name=path)
            if len(texts) != count:
                raise InputError(f"{path}: bytes {start}-{end} hold {len(texts)} lines, planned {count}: "
                                 "the file changed while it was embedded")
            table = pa.table({"id": pa.array(np.arange(first_id, first_id + count), pa.int64())}
                             | ({"text": pa.array(texts, pa.string())} if self.keep_text else {})
                             | {"embedding": self.vectors(texts)})
            meta = {"minibt": json.dumps({"shard": int(shard), "first_id": int(first_id), "rows": int(count),
                                          "run": self.run})}
            final = self.out / shard_name(int(shard))
            tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")   # a retry elsewhere never shares it
            # no dictionary pages: on float vectors they cost 40% more bytes and find nothing to share
            pq.write_table(table.replace_schema_metadata(meta), tmp, use_dictionary=False)
            os.replace(tmp, final)                                      # atomic: a shard file is always whole
            rows.append({"shard": int(shard), "rows": int(count), "node": self.node,
                         "seconds": time.perf_counter() - t0})
        return {k: [r[k] for r in rows] for k in ("shard", "rows", "node", "seconds")}


SHARD_FIELDS = ("shard", "path", "start", "end", "first_id", "rows")


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


# ---------------------------------------------------------------------------------------------- checks on the driver

def require_ray() -> None:
    if ray is None:
        raise MinibtError(MISSING)


def check_model(model: str, attn: str = "auto", dtype=None):
    """Load the model and tokenizer once on the driver, so a bad name fails before any actor starts; the model."""
    import minibt
    loaded = minibt.from_hub(model, attn=attn, dtype=dtype, head="base")
    minibt.load_tokenizer(model)
    return loaded


def check_column(ds: ray.data.Dataset, column: str, count_nulls: bool = True) -> None:
    schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    if column not in names:
        raise InputError(f"column {column!r} is not in the dataset (columns: {', '.join(names) or 'none'})")
    if "embedding" in names:
        raise InputError("the dataset already has an 'embedding' column: drop or rename it first")
    kind = dict(zip(schema.names, schema.types))[column]
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"column {column!r} holds {kind}, not strings: every row must be a string")
    if count_nulls:                          # a read pass over this one column, no model work
        nulls = ds.select_columns([column]).map_batches(
            lambda t: {"nulls": [t.column(0).null_count]}, batch_format="pyarrow").sum("nulls")
        if nulls:
            raise InputError(f"column {column!r} has {nulls} null rows: every row must be a string "
                             "(fill them with '' or filter them out)")


def default_actors(num_cpus: float) -> int:
    """All the cluster's CPUs but one, which read tasks need (actors holding every CPU starve them)."""
    if not ray.is_initialized():
        connect(None)                         # what Ray Data itself would do on first use, kept on loopback
    return max(1, int((ray.cluster_resources().get("CPU", 1) - 1) // num_cpus))


# ---------------------------------------------------------------------------------------------- Python API

def embed_dataset(ds: ray.data.Dataset, model: str, column: str = "text", *, actors: int | None = None,
                  num_cpus: float = 1, batch_size: int = 512, batch_tokens: int | None = None, attn: str = "auto",
                  dtype=None, count_nulls: bool = True) -> ray.data.Dataset:
    """`ds` with an `embedding` column (fixed-size list of float32, the model's width) from `column`; lazy, like
    every Ray Data transform. `actors`: size of the actor pool (default: the cluster's CPUs but one, each actor
    taking `num_cpus`). `count_nulls=False` skips the up-front read pass that rejects null rows."""
    require_ray()
    check_model(model, attn, dtype)
    check_column(ds, column, count_nulls)
    return ds.map_batches(
        Embedder, fn_constructor_kwargs=dict(model=model, attn=attn, dtype=dtype, column=column,
                                             batch_tokens=batch_tokens),
        batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(size=actors or default_actors(num_cpus)))


def plan_shards(sources: list[Path], shard_rows: int, digests: list | None = None) -> tuple[list[dict], int, str | None]:
    """Cut the files into shards of `shard_rows` lines (each file's last shard shorter) by byte offset. ids count
    lines across the files in order, from 0. One pass over the bytes, on the driver; it also counts the lines that
    are not valid UTF-8 (embedded with U+FFFD, as `embed --file` does) and names the first, and appends each file's
    SHA-256 to `digests` (the input fingerprint `--resume` checks, as `embed --file` does)."""
    shards, next_id, invalid, first_invalid = [], 0, 0, None
    for path in sources:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        with f:
            lines, start = Lines(f, name=str(path)), 0    # the reader of `embed --file`: the same lines, counted alike
            while rows := len(lines.take(shard_rows)):
                shards.append(_shard(len(shards), path, start, lines.bytes, next_id, rows))
                start, next_id = lines.bytes, next_id + rows
        if digests is not None:
            digests.append(lines.sha.hexdigest())
        if lines.invalid:
            invalid += lines.invalid
            first_invalid = first_invalid or f"{path} line {lines.first_invalid}"
    return shards, invalid, first_invalid


def _shard(k, path, start, end, first_id, rows) -> dict:
    return {"shard": k, "path": str(path), "start": start, "end": end, "first_id": first_id, "rows": rows}


# ---------------------------------------------------------------------------------------------- corpus -> shards

def keep_on_loopback() -> None:
    """Let a Ray node or driver on this machine keep 127.0.0.1 as its address. Ray replaces a loopback address by
    the machine's outward one (resolve_ip_for_localhost) so that other machines can reach the node; a cluster that
    lives on this one machine needs none of that, and then no Ray connection leaves the loopback interface."""
    import ray._private.services as services
    services.resolve_ip_for_localhost = lambda host: host


def is_loopback(address: str | None) -> bool:
    return not address or address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]")


def check_address(address: str | None, timeout: float = 10) -> None:
    """A HOST:PORT cluster address must answer a TCP connection within `timeout` seconds (ray.init would wait on a
    dead one without end); named in the error. Other forms (auto, ray://...) are left to ray.init."""
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit() and "://" not in address:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except (OSError, OverflowError) as e:
            raise MinibtError(f"--ray {address}: no Ray cluster answers there ({getattr(e, 'strerror', None) or e}); "
                              "start one with `ray start --head`, or give its HOST:PORT") from None


def connect(address: str | None, num_cpus: int | None = None, timeout: float = 10) -> None:
    """Join the cluster at `address`, or start a local Ray on 127.0.0.1 ("local": never an already running one by
    accident). Does nothing when this process is already connected (tests, notebooks). A HOST:PORT that nothing
    answers at within `timeout` seconds is refused by name (ray.init would wait on it without end)."""
    if ray.is_initialized():
        return
    if is_loopback(address):
        keep_on_loopback()
    if not address:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
        return
    check_address(address, timeout)
    try:
        ray.init(address=address, logging_level=logging.WARNING,
                 **({"_node_ip_address": "127.0.0.1"} if is_loopback(address) else {}))
    except (ConnectionError, ValueError) as e:
        raise MinibtError(f"--ray {address}: cannot join a Ray cluster there ({str(e).splitlines()[0][:300]})") \
            from None


def embed_corpus(sources: list[str | Path], out: str | Path, model: str, *, address: str | None = None,
                 actors: int | None = None, num_cpus: float = 1, shard_rows: int = 4096, keep_text: bool = False,
                 resume: bool = False, attn: str = "auto", dtype=None, batch_tokens: int | None = None,
                 progress: bool = True) -> dict:
    """Embed every line of `sources` (in order; ids count lines from 0 across them) into Parquet shards in `out`
    (`id`, `text` with keep_text, `embedding`). resume=True skips the shards already written completely.
    `actors`: default every CPU of the cluster (each taking `num_cpus`): shards are read inside the actors, so no
    read task waits for a CPU. Returns a summary: rows, rows embedded now, shards written / skipped, rows by node,
    wall seconds and the seconds actors spent on their shards."""
    require_ray()
    if not ray.is_initialized():
        check_address(address)                          # fail fast, before loading the model or touching `out`
    sources, out = _check_paths(sources, out)
    loaded = check_model(model, attn, dtype)
    digests = []
    shards, invalid, first_invalid = plan_shards(sources, shard_rows, digests)
    # what decides the rows: resuming with any of it changed is refused, as `embed --file` refuses
    manifest = {"sources": [[str(s), s.stat().st_size, d] for s, d in zip(sources, digests)],
                "shard_rows": shard_rows, "model": str(model),
                "dtype": str(next(loaded.parameters()).dtype).removeprefix("torch."),
                "weights": model_fingerprint(loaded), "dim": loaded.config.hidden_size, "text": keep_text,
                "rows": sum(s["rows"] for s in shards), "shards": len(shards)}
    run = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:32]
    _start_output(out, manifest, resume)
    done = {k for k in range(len(shards)) if _complete(out / shard_name(k), shards[k], run)}
    todo = [s for s in shards if s["shard"] not in done]
    summary = {"rows": manifest["rows"], "embedded": 0, "shards_written": 0, "shards_skipped": len(done),
               "nodes": {}, "seconds": 0.0, "in_actor_seconds": 0.0, "invalid_utf8": invalid}
    if invalid:
        print(f"minibt: {invalid} line(s) had invalid UTF-8 (first: {first_invalid}); their bad bytes are embedded "
              "as U+FFFD", file=sys.stderr)
    start = time.perf_counter()
    if todo:
        connect(address)
        size = min(actors or max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus)), len(todo))
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            ShardWriter, fn_constructor_kwargs=dict(model=model, out=str(out.resolve()), keep_text=keep_text, run=run,
                                                    attn=attn, dtype=dtype, batch_tokens=batch_tokens),
            batch_size=1, batch_format="numpy", num_cpus=num_cpus,
            # one shard in flight per actor: a shard is seconds of work, so queueing a second one behind it only
            # lets one actor hoard the tail while another idles
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1))
        bar = Progress(manifest["rows"], "lines", start=sum(shards[k]["rows"] for k in done), enabled=progress)
        for row in ds.iter_rows():                       # one row per finished shard, as they finish
            summary["embedded"] += row["rows"]
            summary["shards_written"] += 1
            summary["in_actor_seconds"] += row["seconds"]            # reading, embedding, writing the shard
            summary["nodes"][row["node"]] = summary["nodes"].get(row["node"], 0) + row["rows"]
            bar.update(row["rows"], f"{summary['shards_written']}/{len(todo)} shards")
        bar.close()
    for tmp in out.glob(".part-*.tmp"):                  # left by actors that died between write and rename
        tmp.unlink()
    missing = [k for k in range(len(shards)) if not _complete(out / shard_name(k), shards[k], run)]
    if missing:
        raise MinibtError(f"{out}: shards {missing[:10]} are missing after the run")
    summary["seconds"] = time.perf_counter() - start
    return summary


def _check_paths(sources, out) -> tuple[list[Path], Path]:
    """The input files (each must exist, resolved) and the output folder (not a file)."""
    sources = [Path(s).resolve() for s in sources]
    for s in sources:
        if not s.is_file():
            raise InputError(f"{s}: no such file")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; --ray writes a folder of Parquet shards: pick a folder")
    return sources, out


def _start_output(out: Path, manifest: dict, resume: bool) -> None:
    path = out / MANIFEST
    fix = "remove the folder or pick another --out"
    if path.is_file():
        if not resume:
            raise InputError(f"{out} holds a run already: pass --resume to continue it, or pick another --out")
        old = read_json(path, error=InputError)
        diff = [k for k in manifest if old.get(k) != manifest[k]]
        if diff:
            named = {"sources": "input (paths, sizes or content)", "weights": "model weights", "dim": "model width"}
            raise InputError(f"{path}: this output was started with another {', '.join(named.get(k, k) for k in diff)}"
                             f" ({'; '.join(f'{k}={old.get(k)!r}, now {manifest[k]!r}' for k in diff)[:600]}); "
                             f"resume with the same --model, --dtype, input and flags, or {fix}")
        return
    try:
        if out.exists() and any(out.iterdir()):
            raise InputError(f"{out} exists and is not a minibt --ray output (no {MANIFEST}): pick an empty or new "
                             "folder")
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _complete(path: Path, shard: dict, run: str) -> bool:
    """True when `path` is this run's shard `shard`, False when absent. Shards are renamed into place whole; any
    other file under that name (a stray copy, another run's shard, a damaged file) is refused, never overwritten or
    counted: its ids would be duplicated or missing."""
    if not path.exists():
        return False
    want = {"shard": shard["shard"], "first_id": shard["first_id"], "rows": shard["rows"], "run": run}
    ids = range(shard["first_id"], shard["first_id"] + shard["rows"])
    try:
        meta = loads((pq.read_schema(path).metadata or {}).get(b"minibt", b"{}"), f"{path} (its minibt metadata)",
                     error=InputError)
        got = pq.read_table(path, columns=["id"])["id"].to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable shard of this run ({type(e).__name__}: {str(e)[:200]}); remove "
                         "it and rerun with --resume") from None
    if meta != want or got != list(ids):
        have = f"ids {got[0]}..{got[-1]} ({len(got)} rows)" if got else "no rows"
        raise InputError(f"{path}: holds {have}, not ids {ids.start}..{ids.stop - 1} of shard {shard['shard']} of "
                         "this run (a stray or another run's file); remove it and rerun with --resume")
    return True


if __name__ == "__main__":
    # `python -m minibt.tools.ray start ...`: Ray's own `ray` command with its nodes kept on 127.0.0.1 (a
    # multi-node cluster on one machine, as the tests and benchmarks/ray_embed.py start it).
    keep_on_loopback()
    from ray.scripts.scripts import main
    sys.argv[0] = "ray"
    main()
