"""`minibt embed --file`: a corpus of any size, one text per line, to .npy or .jsonl, in bounded memory, resumable.

Lines are read in chunks; each chunk is embedded (minibt.embed: sorted, token-budget batches) and appended to the
output, then a small progress file next to it records how many rows are safely on disk. A killed run resumes with
--resume: the output is cut back to the last recorded row (dropping a chunk that was half-written) and reading
skips the lines already done, so nothing is recomputed, lost or duplicated. Row i of the output is line i of the
input: an empty line is embedded as the empty text, an over-long line is truncated to the model's max_seq_length.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..embed import embed
from ..errors import InputError

_NPY_HEADER = 128      # bytes reserved for the .npy header, rewritten with the final row count at the end


def _npy_header(rows: int, dim: int) -> bytes:
    d = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, dim)
    body = d.ljust(_NPY_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class Writer:
    """Appends rows to out (.npy or .jsonl) and commits progress to out + '.progress' after each chunk."""

    def __init__(self, out: Path, dim: int, source: str, resume: bool):
        self.out, self.dim, self.kind = out, dim, out.suffix
        if self.kind not in (".npy", ".jsonl"):
            raise InputError(f"{out}: output must end in .npy or .jsonl")
        self.progress_path = out.with_name(out.name + ".progress")
        self.rows = 0
        if resume and self.progress_path.is_file():
            state = json.loads(self.progress_path.read_text())
            if state["source"] != source or state["dim"] != dim:
                raise InputError(f"{self.progress_path}: was started for {state['source']} (dim {state['dim']}), "
                                 f"not {source} (dim {dim}); remove it or pick another --out")
            self.rows = state["rows"]
            self.file = open(out, "r+b")
            self.file.truncate(state["bytes"])            # drop anything written after the last commit
            self.file.seek(state["bytes"])
        elif out.exists() and not resume:
            raise InputError(f"{out} exists: pass --resume to continue an interrupted run, or remove it")
        elif resume and out.exists():
            raise InputError(f"{out} exists but {self.progress_path} does not: it is complete (or not ours)")
        else:
            self.file = open(out, "wb")
            if self.kind == ".npy":
                self.file.write(_npy_header(0, dim))
            self._commit(source)
        self.source = source

    def write(self, first_row: int, vecs: np.ndarray) -> None:
        if self.kind == ".npy":
            self.file.write(np.ascontiguousarray(vecs, dtype="<f4").tobytes())
        else:
            self.file.write("".join(json.dumps({"row": first_row + i, "vector": [round(float(x), 7) for x in v]}) + "\n"
                                    for i, v in enumerate(vecs)).encode())
        self.rows += len(vecs)
        self._commit(self.source)

    def _commit(self, source):
        self.file.flush()
        os.fsync(self.file.fileno())
        tmp = self.progress_path.with_name(self.progress_path.name + ".tmp")
        tmp.write_text(json.dumps({"source": source, "dim": self.dim, "rows": self.rows, "bytes": self.file.tell()}))
        os.replace(tmp, self.progress_path)              # atomic: the progress file is always whole

    def finish(self) -> None:
        if self.kind == ".npy":
            self.file.seek(0)
            self.file.write(_npy_header(self.rows, self.dim))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.progress_path.unlink()


def embed_file(model, tok, source: str, out: Path, *, resume=False, chunk=2048, batch_tokens=4096,
               progress=True) -> int:
    """Embed every line of `source` (a path, or '-' for stdin) into `out`; returns the number of rows."""
    stream = sys.stdin if source == "-" else open(source, encoding="utf-8")
    writer = Writer(Path(out), model.config.hidden_size, "<stdin>" if source == "-" else str(Path(source).resolve()),
                    resume)
    lines = (line.rstrip("\n").rstrip("\r") for line in stream)
    done = writer.rows
    for _ in itertools.islice(lines, done):               # already on disk: skip without recomputing
        pass
    start, fresh = time.perf_counter(), 0
    try:
        while True:
            texts = list(itertools.islice(lines, chunk))
            if not texts:
                break
            vecs = embed(model, tok, texts, batch_tokens=batch_tokens, keep_memory=True).numpy()
            writer.write(done, vecs)
            done += len(texts)
            fresh += len(texts)
            if progress:
                rate = fresh / (time.perf_counter() - start)
                print(f"\r{done} texts  {rate:7.1f} texts/s", end="", file=sys.stderr, flush=True)
        writer.finish()
    finally:
        if source != "-":
            stream.close()
    if progress:
        print(file=sys.stderr)
    return done
