"""`minibt serve`: one HTTP endpoint that TEI, OpenAI and Infinity embedding/rerank clients can talk to unchanged.

Three parts, each in its own file:
    serve.py           the app: routes, API key, body limits, admission (429), metrics, the command line
    serve_dialects.py  one adapter per client dialect (TEI, OpenAI, Infinity): parse a body, render the answer
    serve_engine.py    the engine: the queue and the one worker thread that batches every queued request's rows
    serve_net.py       under the `minibt serve` command: the socket, header timeout and connection limit

A request to a model route goes: the Host (loopback without a key) and the key -> its headers (415 content type,
413 Content-Length) -> a slot of --max-concurrent-requests (429, its body unread), held until the answer -> read
the JSON body (bounded in size and time) -> the dialect parses it -> tokens (here, on the event loop; big inputs on
a thread) -> the engine's queue -> the dialect renders the rows -> bytes. Below the app, the
`minibt serve` command bounds connections themselves (serve_net.guarded): headers must arrive in time and idle or half-open
connections cannot fill the server. Starlette + uvicorn (the `serve` extra) are imported only here, never by
`import minibt`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import sys
import time
from collections import Counter

from ..config import Fields, read_json
from ..embedding import Pipeline, prompt_length, text_limit
from ..errors import ConfigError, InputError, MinibtError
from ..hub import inside
from ..reranker import Reranker, kind_of
from .serve_dialects import ApiError, Infinity, OpenAI, Served, Tei, truncation
from .serve_engine import ClientGone, ForwardFailed, Job, Worker

# Job: the engine's unit of work, for callers that put requests on `Service.worker.queue` themselves
__all__ = ["app", "run", "main", "Service", "Job", "render", "rows"]

log = logging.getLogger("minibt.serve")
access = logging.getLogger("minibt.serve.access")      # one line per request: method path status ms
PAYLOAD_LIMIT = 2_000_000            # bytes, as TEI
TOKENIZE_INLINE_CHARS = 20_000       # characters of one request tokenised on the event loop; more: on a thread
TOKENIZE_MAX_TOKENS = 65_536         # tokens in one /tokenize answer (~5 MB of JSON); at least one whole model input
BODY_TIMEOUT = 30.0                  # seconds for a client to send its whole request body (408 after)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
DISCONNECT_POLL = 0.2                # seconds between checks that a waiting request's client is still there
SERVED_HEADS = ("base", "sequence-classification")


try:
    import orjson                    # the serve extra installs it; a plain `pip install starlette uvicorn` may not
except ImportError:
    orjson = None


def rows(vecs):
    """A (..., H) tensor -> a float32 numpy array in C order, which orjson writes without a Python loop."""
    return vecs.float().contiguous().numpy()


def render(out) -> bytes:
    """A response body. Vectors (tensors or numpy rows) are written with the shortest decimal that reads back as the
    same float32 (as TEI writes them): orjson does that ~20x faster than the json module (0.04 vs 0.8 ms for 5 x 384
    values here), whose fallback writes the float64 digits of the same values."""
    if orjson is None:
        return json.dumps(out, default=lambda a: a.tolist()).encode()
    return orjson.dumps(out, default=rows, option=orjson.OPT_SERIALIZE_NUMPY)


def describe(model, model_id: str | None, max_inputs: int) -> Served:
    """What the dialects need to know of `model`, each fact from one source: the widths from the model's own config
    (the classifier's from the same `num_labels` its output layer was built with), pooling and normalisation from
    the sentence-transformers files, label names from config.json's id2label (LABEL_i where it has none). An LLM
    reranker (a minibt.Reranker) gives one score per pair, served at /rerank only."""
    if isinstance(model, Reranker):
        folder = getattr(model.model, "source", None)
        return Served("rerank", None, 1, ["LABEL_0"],
                      model_id or (folder.name if folder else "minibt"), max_inputs)
    if model.head not in SERVED_HEADS:
        raise ConfigError(f"minibt serve serves sentence embeddings (head='base') and cross-encoders "
                          f"(head='sequence-classification'), not head={model.head!r}: load it with head='base'")
    folder = getattr(model, "source", None)
    model_id = model_id or (folder.name if folder else "minibt")
    if model.head == "base":
        pipeline = Pipeline.read(folder, model.config.hidden_size)
        return Served("embed", pipeline, pipeline.width, [], model_id, max_inputs)
    path = inside(folder, "config.json") if folder else None
    id2label = Fields((read_json(path) if path else None) or {}, str(path)).dict("id2label")
    width = model.config.num_labels
    labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(width)]
    return Served("classify", None, width, labels, model_id, max_inputs)


# option -> (an integer?, lowest, lowest itself allowed?, highest): what app() and the command line accept
LIMITS = {"port": (True, 0, True, 65535), "max_batch_tokens": (True, 1, True, None),
          "max_client_batch_size": (True, 1, True, None), "max_concurrent_requests": (True, 1, True, None),
          "max_connections": (True, 1, True, None), "payload_limit": (True, 1, True, None),
          "body_timeout": (False, 0, False, None), "header_timeout": (False, 0, False, None),
          "keep_alive_timeout": (False, 0, True, None)}


def check_options(values: dict, flags: bool = False) -> None:
    """Each limit an integer (or a finite number) in its range, the API key one a client can send: else an InputError
    naming the option, as `--flag` for the command line (flags=True) or `name=` for app()."""
    for key, value in values.items():
        name = f"--{key.replace('_', '-')}" if flags else key
        if key == "api_key":
            check_key(value, name)
            continue
        integer, low, low_ok, high = LIMITS[key]
        number = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
        if isinstance(value, bool) or not number or value < low or value == low and not low_ok or \
                high is not None and value > high:
            rule = (f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}") if integer \
                else f"a finite number {'>=' if low_ok else '>'} {low}"
            raise InputError(f"{name}{' ' if flags else '='}{value!r}: must be {rule}")


def check_key(key, name: str) -> None:
    """None serves without a key. An empty key is refused rather than read as "no key" (or matched by an empty
    `Bearer`): the caller meant to protect the server. A key must survive a header: no white space at its ends
    (clients and servers strip it) and no control characters."""
    if key is None:
        return
    if not isinstance(key, str) or not key:
        raise InputError(f"{name} is empty: give a key, or leave {name} out to serve without one")
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InputError(f"{name}: the key starts or ends with white space or holds a control character, which "
                         "an HTTP header cannot carry")


class Service:
    """Routes, the API key, body limits, admission and metrics around one engine Worker and the three dialects."""

    def __init__(self, model, tok, *, max_batch_tokens, max_client_batch_size, max_concurrent_requests, api_key,
                 auto_truncate, model_id, payload_limit, body_timeout=BODY_TIMEOUT, keep_memory=False,
                 allowed_hosts=None):
        check_options({"max_batch_tokens": max_batch_tokens, "max_client_batch_size": max_client_batch_size,
                       "max_concurrent_requests": max_concurrent_requests, "payload_limit": payload_limit,
                       "body_timeout": body_timeout, "api_key": api_key})
        if isinstance(model, Reranker) and model.kind != "llm":
            raise ConfigError("serve a cross-encoder as its model and tokenizer: "
                              "app(reranker.model, reranker.tokenizer)")
        self.served = served = describe(model, model_id, max_client_batch_size)
        score = None
        self.lowercase = served.pipeline.lowercase if served.pipeline else getattr(model, "lowercase", False)
        if isinstance(model, Reranker):       # an LLM reranker: its prompt tokenizer and its last-position scores
            model, tok, score = model.model, model.prompts, model.forward
        self.tei, self.openai, self.infinity = Tei(served), OpenAI(served), Infinity(served)
        self.limit = text_limit(model, tok, served.pipeline or Pipeline())          # tokens per input
        self.tokenize_limit = max(TOKENIZE_MAX_TOKENS, self.limit)                 # tokens per /tokenize answer
        # Host header values answered (None: any); `minibt serve` on loopback without a key: its own names only
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.quantization = (getattr(model, "quantization", None) or {}).get("scheme")     # "int8" | "int4" | None
        self.attn = getattr(model, "attn", None)
        self.tok = tok
        self.max_batch_tokens, self.max_client_batch_size = max_batch_tokens, max_client_batch_size
        self.max_concurrent_requests, self.api_key = max_concurrent_requests, api_key
        self.auto_truncate, self.payload_limit, self.body_timeout = auto_truncate, payload_limit, body_timeout
        pipeline = served.pipeline and served.pipeline.unnormalized()       # the dialects normalise (TEI: on request)
        self.worker = Worker(model, tok, pipeline, served.width, max_batch_tokens, keep_memory, score)
        self.in_flight = 0                # requests holding a slot: reading their body, tokenising, queued or running
        self.prompt_lengths = {}          # prompt -> its tokens (prompts come from the checkpoint: a few)
        self.answers = Counter()          # (route, status) -> count
        self.counts = Counter()           # inputs, tokens, queue_us, request_us

    # ------------------------------------------------------------------------------------------------ routes

    def asgi(self):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(_app):
            self.worker.start()
            yield
            self.worker.stop()            # after uvicorn has answered every accepted request

        rerankers = ("classify", "rerank")
        models = {"/embed": ("embed", self.tei.embed), "/v1/embeddings": ("embed", self.openai.embeddings),
                  "/embeddings": ("embed", self.openai.embeddings), "/rerank": (rerankers, self._rerank),
                  "/v1/rerank": (rerankers, self._rerank), "/predict": ("classify", self.tei.predict)}
        post = {path: self._model_route(path, kind, parse) for path, (kind, parse) in models.items()}
        post["/tokenize"] = self.tokenize
        get = {"/health": self.health, "/info": self.info, "/metrics": self.metrics, "/v1/models": self.models,
               "/models": self.models}
        routes = [Route(p, self._endpoint(p, fn), methods=["POST"]) for p, fn in post.items()]
        routes += [Route(p, self._endpoint(p, lambda request, timing, fn=fn: fn(timing)), methods=["GET"])
                   for p, fn in get.items()]
        inner = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: self._http_error})

        async def asgi(scope, receive, send):
            """Every HTTP request, routed or not: the Host check, then the routes; one access-log line each."""
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            t0, status = time.perf_counter(), [500]       # 500: uvicorn's answer if nothing was sent

            async def sending(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)
            try:
                refused = self._misdirected(scope)
                if refused is None:
                    await inner(scope, receive, sending)
                else:
                    self.answers["*", refused.status] += 1
                    await self._reply(refused)(scope, receive, sending)
            finally:
                # raw_path: the target as sent, which h11 has checked (no spaces or control characters to forge lines)
                path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
                access.info("%s %s %d %.1f ms", scope["method"], path, status[0], (time.perf_counter() - t0) * 1e3)
        return asgi

    def _rerank(self, body):
        # one route, two dialects: Infinity (and Cohere) send `documents`, TEI sends `texts`
        return (self.infinity if "documents" in body else self.tei).rerank(body)

    def _model_route(self, route, kind, parse):
        """A route that runs the model: the body, parsed by its dialect, tokenised, run, rendered by its dialect."""
        async def answer(request, timing):
            async with self._admitted(request) as body:
                self._need(kind, route)
                ask = parse(body)
                if ask.query is not None:
                    await self._check_query(ask.query)
                encs = await self._encode(body, [ask.prompt + t for t in ask.texts] if ask.prompt else ask.texts,
                                          ask.field, timing)
                skip = self._prompt_length(ask.prompt)
                return ask.answer(await self._run(encs, request, timing, skip), encs)
        return answer

    async def tokenize(self, request, timing):
        """TEI's /tokenize, under the same slots as the model routes; its answer (~70 bytes of JSON a token) is
        bounded: at most tokenize_limit tokens, else 413 before any of it is built."""
        async with self._admitted(request) as body:
            texts, special = self.tei.tokenize(body)
            encs = await self._tokens(texts, "inputs", add_special_tokens=special)
            total = sum(len(e.ids) for e in encs)
            if total > self.tokenize_limit:
                raise ApiError(413, f"`inputs` is {total} tokens, over the limit of {self.tokenize_limit} tokens in "
                                    "one /tokenize answer: split it into several requests")
            return self.tei.tokens(encs)

    async def health(self, timing):
        if not self.worker.thread.is_alive():
            raise ApiError(503, "the model worker is not running", "Unhealthy")
        return {"status": "ok"}

    async def models(self, timing):
        return self.openai.models()

    async def info(self, timing):
        """TEI's /info: the model and every limit this server enforces."""
        s = self.served
        if s.kind == "embed":
            model_type = {"embedding": {"pooling": s.pipeline.pooling, "normalize": s.pipeline.normalize,
                                        "dimensions": s.width}}
        else:
            labels = {"id2label": {str(i): v for i, v in enumerate(s.labels)},
                      "label2id": {v: i for i, v in enumerate(s.labels)}}
            model_type = {"reranker" if s.width == 1 else "classifier": labels}
        return {"model_id": s.model_id, "model_sha": None, "model_dtype": self.dtype, "model_type": model_type,
                "quantization": self.quantization, "backend": "minibt", "attn": self.attn,
                "max_input_length": self.limit, "max_batch_tokens": self.max_batch_tokens,
                "max_client_batch_size": self.max_client_batch_size,
                "max_concurrent_requests": self.max_concurrent_requests, "auto_truncate": self.auto_truncate,
                "payload_limit": self.payload_limit}

    async def metrics(self, timing):
        from starlette.responses import PlainTextResponse
        w, c = self.worker.stats, self.counts
        lines = ["# HELP minibt_requests_total Requests answered, by route and status.",
                 "# TYPE minibt_requests_total counter"]
        lines += [f'minibt_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.answers.items())]
        for name, kind, value, help_ in [
                ("minibt_requests_in_flight", "gauge", self.in_flight,
                 "Requests reading their body, tokenising, queued or running now."),
                ("minibt_request_seconds_total", "counter", c["request_us"] / 1e6,
                 "Time from a request's arrival to its answer, all routes."),
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

    # ------------------------------------------------------------------------------- every request's way in

    def _endpoint(self, route, fn):
        """fn(request, timing) answered in one shape: its object as JSON (200), an ApiError as TEI's error body, any
        other exception as a counted JSON 500 with the traceback in the log; timings as x-*-time headers (ms)."""
        from starlette.responses import Response

        async def endpoint(request):
            t0 = time.perf_counter()
            timing = {}
            try:
                if route != "/health":                     # probes need no key
                    self._authorise(request)
                out, status = await fn(request, timing), 200
            except ApiError as e:
                status, out = e.status, {"error": e.message, "error_type": e.kind}
            except Exception as e:       # noqa: BLE001 - a bug of ours: a counted JSON 500, the traceback logged
                log.exception("minibt serve: %s failed", route)
                status, out = 500, {"error": f"internal error: {type(e).__name__}", "error_type": "Internal"}
            elapsed = time.perf_counter() - t0
            self.answers[route, status] += 1
            self.counts["request_us"] += int(elapsed * 1e6)
            headers = {k: f"{v * 1e3:.3f}" for k, v in timing.items()}
            headers["x-compute-time"] = f"{elapsed * 1e3:.3f}"
            if isinstance(out, Response):
                out.headers.update(headers)
                return out
            return Response(render(out), status_code=status, headers=headers, media_type="application/json")
        return endpoint

    @staticmethod
    def _reply(e: ApiError):
        from starlette.responses import Response
        return Response(render({"error": e.message, "error_type": e.kind}), status_code=e.status,
                        media_type="application/json")

    def _misdirected(self, scope) -> ApiError | None:
        """A server on loopback without a key answers only its own Host names: a web page whose name was rebound to
        127.0.0.1 (DNS rebinding) sends its own name, and is refused before anything is computed."""
        if self.allowed_hosts is None:
            return None
        host = next((v for k, v in scope["headers"] if k == b"host"), b"").decode("latin-1")
        if host.lower() in self.allowed_hosts:
            return None
        return ApiError(403, f"Host {host[:100]!r} is not this server's: on a loopback address without --api-key "
                             f"it answers only {', '.join(sorted(self.allowed_hosts))} (a guard against DNS "
                             "rebinding); give --api-key to serve other names", "Forbidden")

    @staticmethod
    async def _http_error(request, exc):
        """Starlette's own 404 / 405 in the same {"error", "error_type"} shape as ours."""
        from starlette.responses import JSONResponse
        kinds = {404: "NotFound", 405: "MethodNotAllowed"}
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}",
                             "error_type": kinds.get(exc.status_code, "Validation")}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def _authorise(self, request):
        if self.api_key is None:
            return
        # Starlette decodes header bytes as latin-1: encoding back to latin-1 gives the bytes sent, which must be the
        # key's UTF-8 (so a non-ASCII key matches). Only spaces and tabs are stripped: str.strip() would also take
        # a trailing 0xA0, the last byte of some UTF-8 characters.
        scheme, _, given = request.headers.get("authorization", "").strip(" \t").partition(" ")
        if scheme.lower() != "bearer" or \
                not hmac.compare_digest(given.strip(" \t").encode("latin-1"), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key given to --api-key", "Unauthorized")

    @contextlib.asynccontextmanager
    async def _admitted(self, request):
        """Every POST route's way in: the body's headers checked (415, 413), then one of --max-concurrent-requests
        taken (429), and only then the body read, under that slot, which is held until the answer. So a busy server
        refuses at once and reads no body it will not serve: N slots bound the bodies in memory to N x the payload
        limit, not one per open connection."""
        self._check_body_headers(request)
        with self._slot():
            yield await self._json(request)

    def _check_body_headers(self, request) -> None:
        """A body we will not read: not JSON (415), or a Content-Length over the payload limit (413)."""
        # JSON only, as TEI: a page on another site can POST a form or text/plain to a loopback server without the
        # browser asking first, but not application/json
        media = request.headers.get("content-type")
        if (media or "").partition(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "send the body as JSON with the header 'Content-Type: application/json' (got "
                                f"{'no Content-Type' if media is None else repr(media[:100])})", "UnsupportedMediaType")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.payload_limit:
            raise ApiError(413, f"payload is {declared} bytes, over the {self.payload_limit}-byte limit")

    async def _json(self, request) -> dict:
        """The body as a JSON object, read in chunks so that an oversized one is refused before it is all in memory,
        and within --body-timeout so that a stalled client neither holds a connection nor delays a SIGTERM drain."""
        from starlette.requests import ClientDisconnect

        async def read():
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.payload_limit:
                    raise ApiError(413, f"payload is over the {self.payload_limit}-byte limit")
                chunks.append(chunk)
            return b"".join(chunks)
        try:
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

    def _need(self, kinds, route):
        kinds = (kinds,) if isinstance(kinds, str) else kinds
        if self.served.kind not in kinds:
            what = {"embed": "a sentence-embedding model", "classify": "a sequence-classification model (cross-encoder)",
                    "rerank": "an LLM reranker"}
            raise ApiError(400, f"{route} needs {' or '.join(what[k] for k in kinds)}; this server runs "
                                f"{self.served.model_id}, {what[self.served.kind]}")

    @contextlib.contextmanager
    def _slot(self):
        """One of --max-concurrent-requests, held by a POST request from before its body is read to its answer
        (tokenising included, /tokenize too): 429 before any work, its body unread, when all are taken."""
        if self.in_flight >= self.max_concurrent_requests:
            raise ApiError(429, f"model is overloaded: {self.in_flight} requests in flight "
                                f"(--max-concurrent-requests {self.max_concurrent_requests})", "Overloaded")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1           # at once for a client that left: its slot is free for the next

    async def _check_query(self, query: str):
        """A rerank query is tokenised alone, once, before it is paired with each document (N copies tokenised): one
        that fills the model's input by itself is 413, even with truncation, as no document would fit beside it."""
        enc = (await self._tokens([query.lower() if self.lowercase else query], "query"))[0]
        if len(enc.ids) > self.limit:
            raise ApiError(413, f"`query` is {len(enc.ids)} tokens long; this model takes at most {self.limit} "
                                "tokens per input, query and document together: shorten the query")

    # ------------------------------------------------------------------------------------- tokens and the engine

    async def _encode(self, body, texts, name, timing):
        """Token ids for texts (strings or (query, text) pairs); too long: truncate if asked, else 413."""
        t0 = time.perf_counter()
        truncate, direction = truncation(body, self.auto_truncate)
        if self.lowercase:
            texts = [t.lower() if isinstance(t, str) else tuple(x.lower() for x in t) for t in texts]
        encs = await self._tokens(texts, name)
        long = [i for i, e in enumerate(encs) if len(e.ids) > self.limit]
        if long and not truncate:
            i = long[0]
            raise ApiError(413, f"`{name}[{i}]` is {len(encs[i].ids)} tokens long; this model takes at most "
                                f"{self.limit} tokens per input. Send \"truncate\": true (or start the server with "
                                f"--auto-truncate) to keep the first {self.limit} tokens")
        if long:
            cut = await self._tokens([texts[i] for i in long], name, truncation=True, max_length=self.limit,
                                     direction=direction)
            for i, e in zip(long, cut):
                encs[i] = e
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

    def _prompt_length(self, prompt: str) -> int:
        """Tokens of the prompt at the start of each text, tokenised once per prompt (a model has a few)."""
        if prompt not in self.prompt_lengths:
            self.prompt_lengths[prompt] = prompt_length(self.tok, prompt.lower() if self.lowercase else prompt)
        return self.prompt_lengths[prompt]

    async def _run(self, encs, request, timing, skip: int = 0):
        """One request's rows from the engine, in order: (N, width) sentence vectors or (N, labels) logits. skip:
        the prompt's tokens at the start of each (pooling with include_prompt=false leaves them out)."""
        if not self.worker.thread.is_alive():
            raise ApiError(503, "the model worker is not running", "Unhealthy")
        try:
            job = await self.worker.submit(encs, self._disconnect(request), skip)
        except ClientGone:
            raise ApiError(499, "the client disconnected before its answer was ready", "Disconnected") from None
        except ForwardFailed as e:
            raise ApiError(424, f"model forward failed: {e}", "Backend") from None
        timing["x-queue-time"] = job.started - job.queued
        timing["x-inference-time"] = time.perf_counter() - job.started
        self.counts["inputs"] += len(encs)
        self.counts["tokens"] += sum(len(e.ids) for e in encs)
        self.counts["queue_us"] += int((job.started - job.queued) * 1e6)
        return job.out

    @staticmethod
    async def _disconnect(request):
        """Returns once the client of `request` (whose body was read) has gone away."""
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)


def app(model, tokenizer=None, *, max_batch_tokens: int = 16384, max_client_batch_size: int = 32,
        max_concurrent_requests: int = 512, api_key: str | None = None, auto_truncate: bool = False,
        model_id: str | None = None, payload_limit: int = PAYLOAD_LIMIT, body_timeout: float = BODY_TIMEOUT,
        keep_memory: bool = False, allowed_hosts=None):
    """The ASGI app (Starlette) serving `model`: embeddings for head="base", /rerank and /predict for
    head="sequence-classification"; /rerank for an LLM reranker (a minibt.Reranker of kind "llm", which brings its
    own tokenizer: pass None). Its lifespan starts and stops the worker thread. keep_memory=True lets glibc
    keep freed activation memory for reuse (kernels/malloc.py): process-wide, so off unless asked. allowed_hosts:
    the Host header values answered (e.g. ["127.0.0.1:8080", "localhost:8080"]), others 403; None: any.
    Each request is logged (method path status ms) to the "minibt.serve.access" logger at INFO."""
    return Service(model, tokenizer, max_batch_tokens=max_batch_tokens, max_client_batch_size=max_client_batch_size,
                   max_concurrent_requests=max_concurrent_requests, api_key=api_key, auto_truncate=auto_truncate,
                   model_id=model_id, payload_limit=payload_limit, body_timeout=body_timeout,
                   keep_memory=keep_memory, allowed_hosts=allowed_hosts).asgi()


# ------------------------------------------------------------------------------------------------ command line

SERVE_OPTIONS = ("port", "max_batch_tokens", "max_client_batch_size", "max_concurrent_requests", "max_connections",
                 "body_timeout", "header_timeout", "keep_alive_timeout", "api_key")


def load_served(args) -> tuple:
    """(model, tokenizer or None, the head served) for `minibt serve`'s --model: a *ForCausalLM checkpoint that is no
    sentence-embedding model (no Pooling module) is an LLM reranker; a *ForSequenceClassification one a
    cross-encoder; any other sentence embeddings."""
    import minibt
    from ..hub import resolve
    from ..loading import pick_head
    from .cli import dtype_of, model_name
    folder = resolve(model_name(args))
    config_path = inside(folder, "config.json")
    config = read_json(config_path, required=True)
    if kind_of(folder, config) == "llm":
        model = minibt.Reranker(folder, attn=args.attn, dtype=dtype_of(args), quantize=args.quantize)
        return model, None, "llm reranker"
    head = pick_head(config, "auto", SERVED_HEADS, config_path)
    model = minibt.from_hub(folder, attn=args.attn, dtype=dtype_of(args), head=head, quantize=args.quantize)
    return model, minibt.load_tokenizer(folder), head


def allowed_hosts(host: str, port: int, api_key) -> "list[str] | None":
    """The Host headers answered: on loopback without a key only this server's own names (DNS rebinding); with a
    key or on another address, any (None)."""
    ip = ipaddress.ip_address(host)
    loopback = ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)
    if not loopback or api_key is not None:
        return None
    return [f"{name}:{port}" for name in LOOPBACK_NAMES] + (list(LOOPBACK_NAMES) if port == 80 else [])


def run(args) -> None:
    """`minibt serve` (flags: tools/cli.py serve_args). Every failure before the server starts is a MinibtError,
    which the command line answers with one line and exit code 2. Order: the options, the socket (bound), the model
    (a line when loading starts and one when the server is ready), then uvicorn on that socket."""
    check_options({k: getattr(args, k) for k in SERVE_OPTIONS}, flags=True)
    try:
        import uvicorn
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        from .serve_net import AcceptLimitLog, bind, connection_limit, guarded
    except ImportError:
        raise MinibtError("minibt serve needs starlette and uvicorn: pip install 'minibt[serve]'") from None
    from .cli import model_name
    sock = bind(args.host, args.port)
    try:
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        print(f"minibt serve: loading {model_name(args)} ...", flush=True)
        model, tok, head = load_served(args)
        model_id = args.model_id or (str(args.model) if args.model else "sentence-transformers/all-MiniLM-L6-v2")
        # keep_memory: this process is the server's own, so the process-wide malloc setting is ours to make
        asgi = app(model, tok, max_batch_tokens=args.max_batch_tokens,
                   max_client_batch_size=args.max_client_batch_size,
                   max_concurrent_requests=args.max_concurrent_requests, api_key=args.api_key,
                   auto_truncate=args.auto_truncate, model_id=model_id, body_timeout=args.body_timeout,
                   keep_memory=True, allowed_hosts=allowed_hosts(host, port, args.api_key))
        if not args.no_access_log:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            access.addHandler(handler)
            access.setLevel(logging.INFO)
            access.propagate = False
        connections = connection_limit(args.max_connections)
        logging.getLogger("asyncio").addFilter(AcceptLimitLog())
        protocol = guarded(AutoHTTPProtocol, args.header_timeout, connections)
        # SIGTERM/SIGINT: uvicorn stops accepting, answers every request it has accepted, then runs the lifespan's end
        server = uvicorn.Server(uvicorn.Config(asgi, http=protocol, log_level="warning", access_log=False,
                                               timeout_keep_alive=args.keep_alive_timeout,
                                               timeout_graceful_shutdown=None))
        sock.listen(2048)
        capped = "" if connections == args.max_connections else \
            f"; at most {connections} connections (the process's open-file limit)"
        print(f"minibt serve: {model_id} ({head}) ready on {url}{capped}", flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()


def main(argv=None) -> None:
    """`python -m minibt.tools.serve ARGS` is `minibt serve ARGS`: one parser and one error handler (tools/cli.py)."""
    from .cli import main as cli_main
    sys.exit(cli_main(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
