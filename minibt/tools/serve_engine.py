"""The engine of `minibt serve`: one worker thread owns the model and runs every request's rows.

Requests arrive tokenised (the app does that in the event loop) and wait in one queue. Each time the worker looks,
it takes everything queued and packs the rows of all those requests into token-budget batches
(`minibt.embedding.token_batches`), so concurrent small requests share one forward on the padding-free path
(attn="auto" picks varlen for ragged batches). Every request gets exactly its own rows back, in its order, as soon
as its last row is done; an input longer than the budget runs in a batch of its own. A request whose client went
away is marked abandoned and its rows not yet computed are skipped.

Nothing here knows HTTP: failures come back as the exceptions below and the app (tools/serve.py) answers them.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..embedding import token_batches
from ..kernels.malloc import keep_freed_memory


class ForwardFailed(Exception):
    """The model forward that held some of a request's rows raised; the worker goes on with the next batch."""


class ClientGone(Exception):
    """The client left before its answer was ready; its rows not yet computed were dropped."""


@dataclass
class Job:
    """One request's inputs on their way through the worker."""
    encs: list
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    skip: int = 0                    # prompt tokens at the start of each text
    queued: float = field(default_factory=time.perf_counter)
    started: float | None = None     # first forward that holds one of its rows
    out: torch.Tensor | None = None
    left: int = 0
    abandoned: bool = False          # its client went away: the worker skips the rows it has not run yet

    def settle(self, value):
        """Answer the waiting request from the worker thread (futures belong to the event loop's thread)."""
        def put():
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)
        self.loop.call_soon_threadsafe(put)


class Worker:
    """The only thread that runs the model: takes every queued job, batches their rows by token budget.

    pipeline: how a sentence-embedding model's tokens become one vector (embedding.Pipeline: pooling, Dense,
    LayerNorm, Normalize); None for a cross-encoder, whose logits are the rows. width: the length of one row.
    keep_memory: glibc keeps freed activation memory for the next forward (kernels/malloc.py, process-wide, so
    only when the caller asks: the `minibt serve` command does, its process is the server's own).
    score: a batch's encodings -> (rows, width) on the CPU, run in place of the model's own forward (an LLM
    reranker: minibt.Reranker.forward, left padding and the last position's yes/no logits).
    """

    def __init__(self, model, tok, pipeline, width: int, max_batch_tokens: int, keep_memory: bool = False,
                 score=None):
        self.model, self.tok, self.pipeline, self.score = model, tok, pipeline, score
        self.width, self.max_batch_tokens, self.keep_memory = width, max_batch_tokens, keep_memory
        self.device = next(model.parameters()).device
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="minibt-serve-worker", daemon=True)
        self.stats = Counter()           # written by this thread only; read by /metrics

    def start(self):
        self.thread.start()

    def stop(self):
        """Answers everything queued before it, then ends the thread."""
        self.queue.put(None)
        self.thread.join()

    async def submit(self, encs, gone, skip: int = 0) -> Job:
        """Queue one request's encodings and wait for its rows (job.out: (N, width), in order). `gone` is an
        awaitable that finishes when the client has left: then the job is abandoned and ClientGone raised at once,
        without waiting for rows nobody will read. A failed forward raises ForwardFailed."""
        loop = asyncio.get_running_loop()
        job = Job(encs, loop, loop.create_future(), skip)
        watch = asyncio.ensure_future(gone)
        try:
            self.queue.put(job)
            await asyncio.wait((job.future, watch), return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                job.abandoned = True
                raise ClientGone
            job.future.result()
        finally:
            watch.cancel()
        return job

    def _run(self):
        if self.keep_memory:
            keep_freed_memory()
        while True:
            jobs = [self.queue.get()]
            while True:                                   # everything queued meanwhile joins this round
                try:
                    jobs.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in jobs
            jobs = [j for j in jobs if j is not None]
            if jobs:
                self._round(jobs)
            if stop:
                return

    @torch.inference_mode()
    def _round(self, jobs):
        """Every row of every job, packed into token-budget batches; each job is settled by its last row."""
        items = [(job, i) for job in jobs for i in range(len(job.encs))]
        for job in jobs:
            job.out, job.left = torch.empty(len(job.encs), self.width), len(job.encs)
        lengths = [len(job.encs[i].ids) for job, i in items]
        for idx in token_batches(lengths, self.max_batch_tokens):
            owners = {id(items[k][0]): items[k][0] for k in idx}.values()
            live = [k for k in idx if items[k][0].left > 0 and not items[k][0].abandoned]   # failed or gone: skipped
            if not live:
                continue
            start = time.perf_counter()
            for job in owners:
                job.started = job.started or start
            try:
                rows = self._forward([items[k][0].encs[items[k][1]] for k in live], [items[k][0].skip for k in live])
            except Exception as e:       # noqa: BLE001 - any failure fails this batch's requests; the worker goes on
                self._fail(owners, ForwardFailed(f"{type(e).__name__}: {e}"))
                continue
            self.stats["batches"] += 1
            self.stats["batch_rows"] += len(live)
            self.stats["batch_tokens"] += sum(lengths[k] for k in live)
            self.stats["inference_us"] += int((time.perf_counter() - start) * 1e6)
            for row, k in zip(rows, live):
                job, i = items[k]
                job.out[i] = row
                job.left -= 1
                if job.left == 0:
                    job.settle(job.out)

    def _fail(self, jobs, error: ForwardFailed):
        for job in jobs:
            if job.left > 0:
                job.left = 0             # its other rows, in later batches, are skipped
                job.settle(error)
        self.stats["failed_batches"] += 1

    def _forward(self, encs, skips) -> torch.Tensor:
        """One batch of encodings -> (rows, width) on the CPU: sentence vectors or a cross-encoder's logits."""
        if self.score is not None:
            return self.score(encs)
        batch = {k: v.to(self.device) for k, v in self.tok.pad(encs).items()}
        out = self.model(**batch)
        if self.pipeline is None:
            return out.logits.float().cpu()
        skips = torch.tensor(skips, device=self.device)
        return self.pipeline(out.last_hidden_state.float(), batch["attention_mask"], skips).cpu()
