"""`minibt embed --file`: a corpus of any size, one text per line, to .npy or .jsonl, in bounded memory, resumable.

Row i of the output is line i of the input, whatever the bytes, by the line rule of minibt/tools/lines.py (the
same for a file, for stdin and for `embed --ray`); over-long lines are truncated to the model's max_seq_length.

Lines are read in chunks; each chunk is embedded and appended to the output, then a small progress record next to
it (out + ".progress", replaced atomically) says how many rows and bytes are safely on disk, with fingerprints of
the model (config, pooling, and each weight tensor's name, dtype and first bytes), of the input consumed so far
(SHA-256 of its bytes) and of the output written so far (SHA-256). `--resume` checks all three before appending,
so a resume with another model, an edited input or a damaged output is refused with a clear error instead of
mixing rows; the output is cut back to the last recorded byte, dropping a half-written chunk. A full disk (ENOSPC)
or any other write error stops the run with a clear error; the record still describes what is safely on disk, so
`--resume` continues.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np

from ..config import read_json
from ..embedding import PRECISIONS, Pipeline, check_dim, embed, quantize
from ..errors import InputError, MinibtError
from ..outputs import atomic, check_target, create_new, open_existing
from .lines import Lines, count_lines
from .progress import Progress

_NPY_HEADER = 128      # bytes reserved for the .npy header, rewritten with the final row count at the end
_PIECE = 256           # lines per embed() call inside a chunk: the progress bar moves at least this often


def _npy_header(rows: int, dim: int, descr: str = "<f4") -> bytes:
    d = "{'descr': '%s', 'fortran_order': False, 'shape': (%d, %d), }" % (descr, rows, dim)
    body = d.ljust(_NPY_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def model_fingerprint(model) -> str:
    """What decides the vectors: config, dtype, pooling recipe, and every weight tensor's name, shape and first
    64 KiB of bytes, so another checkpoint of the same width (or a fine-tuned copy) is told apart without hashing
    gigabytes (about 10 ms for bert-base)."""
    import torch
    h = hashlib.sha256(repr(model.config).encode())
    h.update(repr(Pipeline.read(getattr(model, "source", None), model.config.hidden_size)).encode())
    for name, t in model.state_dict().items():
        t = t.detach().reshape(-1)[: 2**16 // t.element_size()].contiguous().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class Writer:
    """Appends rows to out (.npy or .jsonl) and commits progress to out + '.progress' after each chunk."""

    def __init__(self, out: Path, dim: int, source: str, resume: bool, model: str = "", descr: str = "<f4"):
        self.out, self.dim, self.kind, self.source, self.model = out, dim, out.suffix, source, model
        self.descr = descr                     # the .npy dtype: "<f4", or "|i1" / "|u1" for binary / ubinary
        if self.kind not in (".npy", ".jsonl"):
            raise InputError(f"{out}: output must end in .npy or .jsonl")
        self.progress_path = out.with_name(out.name + ".progress")
        self.start = _NPY_HEADER if self.kind == ".npy" else 0      # the hash skips the header (rewritten at the end)
        self.rows, self.state = 0, None
        check_target(out)
        check_target(self.progress_path, what="progress record")
        if resume and self.progress_path.is_file():
            self._reopen()
        elif out.exists() and not resume:
            raise InputError(f"{out} exists: pass --resume to continue an interrupted run, or remove it")
        elif resume and out.exists():
            raise InputError(f"{out} exists but {self.progress_path} does not: it is complete (or not ours)")
        else:
            self.file = create_new(out)             # exclusively: never through a link planted at `out`
            self.sha = hashlib.sha256()
            self._write(_npy_header(0, dim, descr) if self.kind == ".npy" else b"", hashed=False)
            self.commit(0, hashlib.sha256().hexdigest())       # nothing consumed yet

    def _reopen(self):
        state = read_json(self.progress_path, error=InputError, required=True)
        try:
            rows, size, dim = int(state["rows"]), int(state["bytes"]), int(state["dim"])
        except (ValueError, KeyError, TypeError, OverflowError):
            raise InputError(f"{self.progress_path}: not a progress record minibt wrote; remove it and {self.out}") \
                from None
        fix = f"remove {self.out} and {self.progress_path} to start again, or pick another --out"
        if state.get("source") != self.source:
            raise InputError(f"{self.progress_path}: was started for {state.get('source')}, not {self.source}; {fix}")
        if dim != self.dim or state.get("model") != self.model:
            raise InputError(f"{self.progress_path}: was started with another model (weights fingerprint "
                             f"{state.get('model')}, dim {dim}; this one is {self.model}, dim {self.dim}); "
                             f"resume with the same --model, --dtype, --prompt, --truncate-dim and --precision, "
                             f"or {fix}")
        if not self.out.is_file() or self.out.stat().st_size < size:
            have = self.out.stat().st_size if self.out.is_file() else 0
            raise InputError(f"{self.out}: {have} bytes, shorter than the {size} bytes its progress record says are "
                             f"done (truncated or replaced); {fix}")
        self.file = open_existing(self.out)
        self.sha = hashlib.sha256()
        self.file.seek(self.start)
        left = size - self.start
        while left > 0:
            block = self.file.read(min(left, 1 << 20))
            self.sha.update(block)
            left -= len(block)
        if self.sha.hexdigest() != state.get("output_sha256"):
            raise InputError(f"{self.out}: its first {size} bytes are not what this run wrote (changed since); {fix}")
        self.file.truncate(size)                          # drop anything written after the last commit
        self.file.seek(size)
        self.rows, self.state = rows, state

    def _write(self, data: bytes, hashed=True):
        try:
            self.file.write(data)
        except OSError as e:
            self._failed(e)
        if hashed:
            self.sha.update(data)

    def _failed(self, e: OSError):
        why = "the disk is full (ENOSPC)" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
        raise MinibtError(f"cannot write {self.out}: {why}. The first {self.rows} rows are safely on disk; "
                          "free space and rerun the same command with --resume to continue") from None

    def append(self, first_row: int, vecs: np.ndarray) -> None:
        if self.kind == ".npy":
            data = np.ascontiguousarray(vecs, dtype=self.descr).tobytes()
        else:
            value = (lambda x: round(float(x), 7)) if self.descr == "<f4" else int
            data = "".join(json.dumps({"row": first_row + i, "vector": [value(x) for x in v]}) + "\n"
                           for i, v in enumerate(vecs)).encode()
        self._write(data)

    def commit(self, rows: int, input_sha: str, input_bytes: int = 0) -> None:
        """Make the rows appended so far durable, then record them (the record never runs ahead of the data)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            record = json.dumps({"source": self.source, "model": self.model, "dim": self.dim, "rows": rows,
                                 "bytes": self.file.tell(), "output_sha256": self.sha.hexdigest(),
                                 "input_bytes": input_bytes, "input_sha256": input_sha})
            with atomic(self.progress_path, what="progress record") as tmp:    # always whole, never via a link
                tmp.write_text(record)
        except OSError as e:
            self._failed(e)
        self.rows = rows

    def finish(self) -> None:
        try:
            if self.kind == ".npy":
                self.file.seek(0)
                self.file.write(_npy_header(self.rows, self.dim, self.descr))
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            self._failed(e)
        self.file.close()
        self.progress_path.unlink()


def check_input(fd: int, name: str) -> bool:
    """True for a regular file, False for a pipe (a FIFO, `<(cmd)`, a shell pipe: streamed once, line by line);
    anything else (a device such as /dev/zero, a socket, a folder) is refused by name. A terminal on stdin is
    read like a pipe."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return True
    if stat.S_ISFIFO(mode) or os.isatty(fd):
        return False
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else
            "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise InputError(f"--file {name} is {kind}, not a file of lines; refused")


def open_input(source: str):
    """(binary stream, its name, its line count or None) for `source`, a path or '-' (stdin): a file is counted
    first (a progress bar with a total); a pipe is read once, as it streams. Unreadable: InputError naming it."""
    if source == "-":
        check_input(sys.stdin.fileno(), "<stdin>")
        return sys.stdin.buffer, "<stdin>", None
    path = Path(source)
    try:
        stream = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read {source}: {e.strerror or e}") from None
    try:
        regular = check_input(stream.fileno(), source)
        return stream, str(path.resolve()), count_lines(path) if regular else None
    except OSError as e:
        stream.close()
        raise InputError(f"cannot read {source}: {e.strerror or e}") from None
    except MinibtError:
        stream.close()
        raise


def embed_file(model, tok, source: str, out: Path, *, resume=False, chunk=2048, batch_tokens=None,
               progress=True, prompt_name=None, prompt=None, truncate_dim=None, precision="float32") -> int:
    """Embed every line of `source` (a path, or '-' for stdin) into `out`; returns the number of rows.
    prompt_name / prompt / truncate_dim: as minibt.embed; precision: float32, binary or ubinary (one bit per value,
    each row on its own). int8 / uint8 are refused: their buckets come from the min and max of every vector, which
    a file written chunk by chunk does not have until the end (quantize the float32 output afterwards)."""
    if chunk < 1:
        raise InputError(f"chunk={chunk}: must be at least 1 line")
    pipeline = Pipeline.read(getattr(model, "source", None), model.config.hidden_size)
    before = pipeline.prompt(prompt_name, prompt)
    check_dim(truncate_dim, pipeline.width)
    if precision not in ("float32", "binary", "ubinary"):
        raise InputError(f"precision={precision!r} with --file: float32, binary or ubinary (int8 and uint8 calibrate "
                         "each dimension over all the vectors: quantize the float32 output with "
                         "minibt.embedding.quantize)" if precision in PRECISIONS else
                         f"precision={precision!r}: one of {', '.join(PRECISIONS)}")
    width = truncate_dim or pipeline.width
    width, descr = (width, "<f4") if precision == "float32" else ((width + 7) // 8, "|i1" if precision == "binary"
                                                                 else "|u1")
    settings = f"{model_fingerprint(model)}|{before}|{truncate_dim}|{precision}"
    fingerprint = hashlib.sha256(settings.encode()).hexdigest()[:32]
    stream, name, total = open_input(source)
    try:
        writer = Writer(Path(out), width, name, resume, fingerprint, descr)
        lines = Lines(stream, name=name)
        done = writer.rows
        if writer.state is not None:                      # already on disk: check the input, skip, never recompute
            skipped = lines.take(done)
            if len(skipped) < done or lines.sha.hexdigest() != writer.state.get("input_sha256"):
                raise InputError(f"{name}: its first {done} lines are not the ones embedded into {out} (the input "
                                 f"changed since); remove {out} and {writer.progress_path} to start again")
        bar = Progress(total, "lines", start=done, enabled=progress)
        while texts := lines.take(chunk):
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))     # similar lengths share a piece
            vecs = np.empty((len(texts), width), dtype=descr)
            for i in range(0, len(order), _PIECE):
                idx = order[i:i + _PIECE]
                piece = embed(model, tok, [texts[j] for j in idx], batch_tokens=batch_tokens, keep_memory=True,
                              prompt=before, truncate_dim=truncate_dim, pipeline=pipeline)
                vecs[idx] = quantize(piece, precision)
                bar.update(len(idx))
            writer.append(done, vecs)
            done += len(texts)
            writer.commit(done, lines.sha.hexdigest(), lines.bytes)
        writer.finish()
        bar.close()
    finally:
        if source != "-":
            stream.close()
    if lines.invalid:
        print(f"minibt: {lines.invalid} line(s) had invalid UTF-8 (first: line {lines.first_invalid}); their bad "
              "bytes were embedded as U+FFFD", file=sys.stderr)
    return done
