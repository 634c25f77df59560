"""The client dialects `minibt serve` speaks, one adapter each. An adapter parses a request body (every check that
needs no model, so that a bad request costs no tokenising and no forward) and says how the model's rows become its
answer:

    Tei       text-embeddings-inference: /embed, /rerank {query, texts}, /predict, /tokenize
    OpenAI    the embeddings API: /v1/embeddings (alias /embeddings, which Infinity speaks too), /v1/models
    Infinity  Infinity's (and Cohere's) rerank: /rerank and /v1/rerank {query, documents}

Everything between parse and answer (tokens, admission, the engine's queue) is the app's (tools/serve.py). Vectors
stay torch tensors here; the app writes them as float32 rows. Errors of every dialect are TEI's {"error",
"error_type"} bodies (ApiError), which is what the clients of all three accept.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F

from ..embedding import Pipeline
from ..errors import InputError


class ApiError(Exception):
    """An answer other than 200: TEI's {"error", "error_type"} body with its status."""

    def __init__(self, status: int, message: str, kind: str = "Validation"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class Served:
    """What the dialects know of the served model, and the one limit they check themselves."""
    kind: str                  # "embed" (head="base"), "classify" (head="sequence-classification") or "rerank"
                               # (an LLM reranker, minibt.Reranker: one score per pair, /rerank only)
    pipeline: Pipeline | None  # the sentence-transformers pipeline (pooling, Dense, Normalize, prompts); None: classify
    width: int                 # vector width, or the classifier's number of labels
    labels: list               # the classifier's label names, by index; [] for "embed"
    model_id: str
    max_inputs: int            # inputs in one request (--max-client-batch-size)


@dataclass(frozen=True)
class Ask:
    """One parsed request: the inputs to run and how their rows become the answer."""
    texts: list                # strings, or (query, text) pairs for a cross-encoder
    field: str                 # the body field they came from, named in errors
    answer: Callable           # (rows: (N, width) tensor, encodings) -> the response body
    prompt: str = ""           # put before every text (a sentence-embedding model's prompt)
    query: str | None = None   # a rerank's query, which the app checks alone before pairing it with each text


# ------------------------------------------------------------------------------ checks every dialect shares

def texts_of(body, name: str, most: int) -> list:
    """body[name]: a non-empty string or a non-empty list of them, at most `most` (413 above: the client splits)."""
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
    if len(texts) > most:
        raise ApiError(413, f"`{name}` has {len(texts)} inputs, over the limit of {most} per request "
                            "(--max-client-batch-size): split it into several requests")
    return texts


def flag(body, name: str, default: bool) -> bool:
    """A true/false field; absent or null: the default."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(422, f"`{name}` must be true or false, not {json.dumps(value)}")
    return value


def truncation(body, default: bool) -> tuple[bool, str]:
    """TEI's {truncate, truncation_direction}, which every route honours: (cut long inputs?, "left" | "right")."""
    truncate = flag(body, "truncate", default)
    direction = body.get("truncation_direction", "right")
    direction = "right" if direction is None else direction
    if not isinstance(direction, str) or direction.lower() not in ("left", "right"):
        raise ApiError(422, f"`truncation_direction` must be \"Left\" or \"Right\", not {json.dumps(direction)}")
    return truncate, direction.lower()


def dimensions(body, width: int) -> int | None:
    """OpenAI's and TEI's `dimensions` (Matryoshka): an integer in 1..width, or None for every value."""
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= width):
        raise ApiError(422, f"`dimensions` must be an integer from 1 to {width} (this model's width), "
                            f"not {json.dumps(dims)}")
    return dims


def prompt_of(served: Served, body) -> str:
    """TEI's `prompt_name` (a name in the checkpoint's prompts); absent: the checkpoint's default prompt, if any."""
    name = body.get("prompt_name")
    if name is not None and not isinstance(name, str):
        raise ApiError(422, "`prompt_name` must be a string")
    try:
        return served.pipeline.prompt(name)
    except InputError as e:
        raise ApiError(422, f"`prompt_name`: {e}") from None


def vectors(vecs, normalize: bool, dims: int | None):
    """Unit length if asked; Matryoshka `dims`: the first dims values, unit length again if the vectors were."""
    vecs = F.normalize(vecs, dim=-1) if normalize else vecs
    if dims is None:
        return vecs
    return F.normalize(vecs[:, :dims], dim=-1) if normalize else vecs[:, :dims]


def scores(logits, raw: bool):
    """A cross-encoder's logits as clients expect them: one label a sigmoid, several a softmax; raw if asked."""
    if raw:
        return logits
    return logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(-1)


def usage(encs) -> dict:
    tokens = sum(len(e.ids) for e in encs)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


@dataclass(frozen=True)
class Rerank:
    """A rerank request, read from either dialect's field names: one query scored against each document."""
    query: str
    docs: list
    field: str                 # "texts" (TEI) or "documents" (Infinity)
    top_n: int | None
    raw: bool
    back: bool                 # echo each document in the answer

    @classmethod
    def parse(cls, served: Served, body, field: str, back: str) -> Rerank:
        if served.width != 1:
            raise ApiError(400, f"/rerank needs a cross-encoder with one score; {served.model_id} has "
                                f"{served.width} labels: use /predict")
        query = body.get("query")
        if not isinstance(query, str) or not query:
            raise ApiError(422, "`query` must be a non-empty string", "Empty" if query == "" else "Validation")
        docs = texts_of(body, field, served.max_inputs)
        top_n = body.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
            raise ApiError(422, f"`top_n` must be a positive integer, not {json.dumps(top_n)}")
        return cls(query, docs, field, top_n, flag(body, "raw_scores", False), flag(body, back, False))

    def ask(self, answer) -> Ask:
        return Ask([(self.query, d) for d in self.docs], self.field, answer, query=self.query)

    def ranked(self, logits) -> list:
        """(index, score) pairs, best first, the first top_n."""
        values = scores(logits, self.raw)[:, 0].tolist()
        return sorted(enumerate(values), key=lambda p: -p[1])[:self.top_n]


# ------------------------------------------------------------------------------------------------- dialects

class Tei:
    """Text-embeddings-inference's routes and shapes."""

    def __init__(self, served: Served):
        self.served = served

    def embed(self, body) -> Ask:
        """{inputs, normalize, truncate, truncation_direction, dimensions, prompt_name} -> [[f32]]"""
        texts = texts_of(body, "inputs", self.served.max_inputs)
        normalize = flag(body, "normalize", self.served.pipeline.normalize)
        dims = dimensions(body, self.served.width)
        return Ask(texts, "inputs", lambda vecs, encs: vectors(vecs, normalize, dims), prompt_of(self.served, body))

    def rerank(self, body) -> Ask:
        """{query, texts, raw_scores, return_text} -> [{index, score, text?}], best first."""
        r = Rerank.parse(self.served, body, "texts", "return_text")
        return r.ask(lambda logits, encs: [{"index": i, "score": s, **({"text": r.docs[i]} if r.back else {})}
                                           for i, s in r.ranked(logits)])

    def predict(self, body) -> Ask:
        """{inputs: text | [a, b] (one pair) | [text or pair, ...], raw_scores} -> [{score, label}] (or a list of
        those per input), best first. Like TEI, a list of exactly two strings is read as one pair."""
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
        if len(items) > self.served.max_inputs:
            raise ApiError(413, f"`inputs` has {len(items)} inputs, over the limit of {self.served.max_inputs} "
                                "per request (--max-client-batch-size)")
        if any(not all(t if isinstance(t, list) else [t]) for t in items):
            raise ApiError(422, "`inputs` holds an empty string", "Empty")
        raw = flag(body, "raw_scores", False)

        def answer(logits, encs):
            labels = self.served.labels
            out = [sorted(({"score": s, "label": labels[j]} for j, s in enumerate(row)), key=lambda p: -p["score"])
                   for row in scores(logits, raw).tolist()]
            return out[0] if single else out
        return Ask([tuple(t) if isinstance(t, list) else t for t in items], "inputs", answer)

    def tokenize(self, body) -> tuple[list, bool]:
        """{inputs, add_special_tokens} -> (texts, add_special_tokens); no model runs, so no Ask."""
        return texts_of(body, "inputs", self.served.max_inputs), flag(body, "add_special_tokens", True)

    @staticmethod
    def tokens(encs) -> list:
        """-> [[{id, text, special, start, stop}]]; special tokens have no place in the text."""
        return [[{"id": i, "text": t, "special": bool(s), "start": None if s else a, "stop": None if s else b}
                 for i, t, s, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets)] for e in encs]


class OpenAI:
    """The OpenAI embeddings API (the official client sends encoding_format="base64" unless told otherwise)."""

    def __init__(self, served: Served):
        self.served = served

    def embeddings(self, body) -> Ask:
        """{input, model, encoding_format, dimensions} -> {object: list, data, model, usage}"""
        value = body.get("input")
        if isinstance(value, list) and value and all(isinstance(t, list) or isinstance(t, int) and not isinstance(t, bool)
                                                     for t in value):
            raise ApiError(422, "`input` as token ids is not supported: send the texts")
        texts = texts_of(body, "input", self.served.max_inputs)
        fmt = body.get("encoding_format", "float")
        fmt = "float" if fmt is None else fmt
        if fmt not in ("float", "base64"):
            raise ApiError(422, f"`encoding_format` must be \"float\" or \"base64\", not {json.dumps(fmt)}")
        dims = dimensions(body, self.served.width)

        def answer(vecs, encs):
            vecs = vectors(vecs, self.served.pipeline.normalize, dims)
            data = list(vecs) if fmt == "float" else \
                [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vecs]
            return {"object": "list", "model": self.served.model_id, "usage": usage(encs),
                    "data": [{"object": "embedding", "embedding": d, "index": i} for i, d in enumerate(data)]}
        return Ask(texts, "input", answer, prompt_of(self.served, {}))

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.served.model_id, "object": "model", "created": 0,
                                            "owned_by": "minibt"}]}


class Infinity:
    """Infinity's rerank, which is Cohere's shape (its embeddings are OpenAI's)."""

    def __init__(self, served: Served):
        self.served = served

    def rerank(self, body) -> Ask:
        """{query, documents, top_n, return_documents, raw_scores} -> {results: [{relevance_score, index,
        document}], usage}, best first."""
        r = Rerank.parse(self.served, body, "documents", "return_documents")

        def answer(logits, encs):
            return {"object": "rerank", "model": self.served.model_id, "usage": usage(encs),
                    "results": [{"relevance_score": s, "index": i, "document": r.docs[i] if r.back else None}
                                for i, s in r.ranked(logits)]}
        return r.ask(answer)
