"""minibt serve: real server processes on 127.0.0.1, spoken to by the official openai client and httpx (TEI shapes)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import minibt  # noqa: E402
from minibt.embedding import Pooling  # noqa: E402
from minibt.tools import serve  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired engineers measure attention kernels on a "
         "shared machine and argue about padding tokens batches queues servers latency").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output(proc) -> str:
    """What a `server` process has written to stdout and stderr so far (a thread reads it as it comes, so that the
    access log never fills the pipe and stalls the server)."""
    return "".join(proc.lines)


@contextlib.contextmanager
def server(*args, preexec_fn=None):
    """`python -m minibt.tools.serve ARGS` on a free port; yields (base url, process); SIGTERM at the end."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "minibt.tools.serve", "--port", str(port), *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=preexec_fn)
    proc.lines = []
    proc.reader = threading.Thread(target=lambda: proc.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    proc.reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                proc.reader.join(10)
                raise RuntimeError(f"server exited with {proc.returncode}:\n{output(proc)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not start within 90 s"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.reader.join(10)


@pytest.fixture(scope="module")
def mini(minilm):
    return minibt.from_hub(minilm, head="base"), minibt.load_tokenizer(minilm)


@pytest.fixture(scope="module")
def minilm_server(minilm):
    # a budget below the longest input (256 tokens): such inputs must still run, alone
    with server("--model", minilm, "--api-key", KEY, "--max-batch-tokens", 200, "--model-id", "mini") as (url, _):
        yield url


def test_openai_client_float_and_base64_equal_embed(minilm_server, mini):
    model, tok = mini
    texts = ["A man is eating food.", "A cheetah chases prey across a field, very fast, for a long time.", "Hi"]
    ref = minibt.embed(model, tok, texts)
    client = openai.OpenAI(base_url=minilm_server + "/v1", api_key=KEY, max_retries=0)
    floats = client.embeddings.create(input=texts, model="mini", encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == "mini"
    torch.testing.assert_close(torch.tensor([d.embedding for d in floats.data]), ref, atol=1e-5, rtol=0)
    assert floats.usage.prompt_tokens == sum(len(e.ids) for e in tok.encode(texts))
    raw = client.embeddings.create(input=texts, model="mini", encoding_format="base64")
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    torch.testing.assert_close(torch.from_numpy(got.copy()), ref, atol=1e-5, rtol=0)
    default = client.embeddings.create(input=texts[1], model="mini")       # the client asks base64 and decodes it
    torch.testing.assert_close(torch.tensor(default.data[0].embedding), ref[1], atol=1e-5, rtol=0)
    short = client.embeddings.create(input=texts, model="mini", encoding_format="float", dimensions=64)
    want = torch.nn.functional.normalize(ref[:, :64], dim=-1)
    torch.testing.assert_close(torch.tensor([d.embedding for d in short.data]), want, atol=1e-5, rtol=0)


def test_benchmark_load_generator_reads_what_httpx_reads(minilm_server):
    """benchmarks/serve_load.py measures with its own small HTTP client (LeanClient): it must get the bytes and
    statuses httpx gets, over one kept-alive connection, and an error status must come back, not be hidden."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    body = {"input": ["A man is eating food.", "Hi"], "model": "mini"}
    want = httpx.post(minilm_server + "/embeddings", json=body, headers=AUTH, timeout=30)

    async def go():
        client, keyless = bench.LeanClient(AUTH), bench.LeanClient()
        try:
            first = await client.post(minilm_server + "/embeddings", body)
            second = await client.post(minilm_server + "/embeddings", body)
            opened = len(client.idle[minilm_server + "/embeddings"])
            return first, second, opened, await keyless.post(minilm_server + "/embeddings", body)
        finally:
            await client.aclose()
            await keyless.aclose()
    first, second, opened, bad = asyncio.run(go())
    assert first == second == (200, want.content) and opened == 1
    assert bad[0] == 401 and json.loads(bad[1])["error_type"]


def test_tei_routes(minilm_server, mini):
    model, tok = mini
    c = httpx.Client(base_url=minilm_server, headers=AUTH, timeout=60)
    texts = ["first text", "a second, longer text about servers and queues"]
    r = c.post("/embed", json={"inputs": texts})
    assert r.status_code == 200 and float(r.headers["x-compute-time"]) >= 0 and "x-queue-time" in r.headers
    torch.testing.assert_close(torch.tensor(r.json()), minibt.embed(model, tok, texts), atol=1e-5, rtol=0)
    one = c.post("/embed", json={"inputs": "first text", "normalize": False}).json()
    batch = tok(["first text"])
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    torch.testing.assert_close(torch.tensor(one), Pooling()(hidden, batch["attention_mask"], torch.zeros(len(hidden))), atol=1e-5, rtol=0)
    # longer than the model (256 tokens) and than the batch budget (200): truncated on request, runs alone
    long = "word " * 400
    r = c.post("/embed", json={"inputs": [long, "short"], "truncate": True})
    assert r.status_code == 200
    torch.testing.assert_close(torch.tensor(r.json()), minibt.embed(model, tok, [long, "short"]), atol=1e-5, rtol=0)
    tail = c.post("/embed", json={"inputs": "alpha " + long, "truncate": True, "truncation_direction": "Left"}).json()
    torch.testing.assert_close(torch.tensor(tail), minibt.embed(model, tok, [long]), atol=1e-5, rtol=0)
    cut = c.post("/embed", json={"inputs": "first text", "normalize": False, "dimensions": 8}).json()
    torch.testing.assert_close(torch.tensor(cut), torch.tensor(one)[:, :8], atol=1e-6, rtol=0)   # no re-normalising
    big = "tokenised on a thread " * 1200                           # over serve.TOKENIZE_INLINE_CHARS
    assert len(big) > serve.TOKENIZE_INLINE_CHARS
    r = c.post("/embed", json={"inputs": [big, "short"], "truncate": True})
    torch.testing.assert_close(torch.tensor(r.json()), minibt.embed(model, tok, [big, "short"]), atol=1e-5, rtol=0)
    assert [t["id"] for t in c.post("/tokenize", json={"inputs": big}).json()[0]] == tok.encode([big])[0].ids
    toks = c.post("/tokenize", json={"inputs": "hello world"}).json()
    assert [t["text"] for t in toks[0]] == ["[CLS]", "hello", "world", "[SEP]"] and toks[0][1]["start"] == 0
    info = c.get("/info").json()
    assert info["max_input_length"] == 256 and info["model_type"]["embedding"]["pooling"] == "mean"
    assert info["quantization"] is None and info["model_dtype"] == "float32"
    assert c.get("/v1/models").json()["data"][0]["id"] == "mini"
    assert c.get("/health").status_code == 200
    metrics = c.get("/metrics").text
    assert 'minibt_requests_total{route="/embed",status="200"}' in metrics and "minibt_batches_total" in metrics


BAD = [  # (route, body as bytes or JSON, status, words the message must name)
    ("/embed", b"{not json", 422, "not valid JSON"),
    ("/embed", b"[1, 2]", 422, "JSON object"),
    ("/embed", {"inputs": 3}, 422, "`inputs`"),
    ("/embed", {"inputs": ["ok", 4]}, 422, "`inputs`"),
    ("/embed", {}, 422, "`inputs`"),
    ("/embed", {"inputs": []}, 422, "empty"),
    ("/embed", {"inputs": ["fine", ""]}, 422, "`inputs[1]`"),
    ("/embed", {"inputs": ["x"] * 33}, 413, "--max-client-batch-size"),
    ("/embed", {"inputs": "word " * 300}, 413, "256 tokens"),
    ("/embed", {"inputs": "a", "truncate": "yes"}, 422, "`truncate`"),
    ("/embed", {"inputs": "a", "truncation_direction": "up"}, 422, "truncation_direction"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 422, "encoding_format"),
    ("/v1/embeddings", {"input": "a", "dimensions": 385}, 422, "`dimensions`"),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, 422, "`dimensions`"),
    ("/v1/embeddings", {"input": [[101, 102]]}, 422, "token ids"),
    ("/embed", b'{"inputs": "' + b"a" * 2_000_001 + b'"}', 413, "2000000-byte limit"),
    ("/rerank", {"query": "q", "texts": ["a"]}, 400, "sequence-classification"),
    ("/embed", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 422, "not valid JSON"),   # nested too deep
    ("/tokenize", b'{"inputs": "\\ud800"}', 422, "`inputs`"),          # a lone surrogate: the tokenizer refuses it
    ("/embed", b'{"inputs": "\\ud800"}', 422, "`inputs`"),
    ("/embed", {"inputs": "a", "truncation_direction": False}, 422, "truncation_direction"),
    ("/v1/embeddings", {"input": "a", "encoding_format": ""}, 422, "encoding_format"),
    ("/v1/embeddings", {"input": [True]}, 422, "`input`"),
    ("/nowhere", {"inputs": "a"}, 404, "/nowhere"),
]


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{b[0]}-{b[2]}-{b[3][:14]}" for b in BAD])
def test_bad_requests_answered_and_server_keeps_serving(minilm_server, route, body, status, words):
    c = httpx.Client(base_url=minilm_server, headers=AUTH, timeout=60)
    r = c.post(route, content=body, headers={"Content-Type": "application/json"}) if isinstance(body, bytes) \
        else c.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error", "error_type"} and words in err["error"], err
    assert "site-packages" not in err["error"]                  # no server paths in answers
    assert c.post("/embed", json={"inputs": "still here"}).status_code == 200


def test_bad_dimensions_cost_no_forward_and_wrong_method_is_json(minilm_server):
    c = httpx.Client(base_url=minilm_server, headers=AUTH, timeout=60)

    def batches():
        line = next(x for x in c.get("/metrics").text.splitlines() if x.startswith("minibt_batches_total"))
        return float(line.split()[1])
    before = batches()
    for route, body in (("/embed", {"inputs": ["a"] * 32, "dimensions": 0}),
                        ("/v1/embeddings", {"input": ["a"] * 32, "dimensions": 9999})):
        r = c.post(route, json=body)
        assert r.status_code == 422 and "`dimensions`" in r.json()["error"]
    assert batches() == before                                   # refused before anything was queued
    r = c.get("/embed")
    assert r.status_code == 405 and r.json()["error_type"] == "MethodNotAllowed"


def test_work_of_clients_that_went_away_is_dropped(minilm):
    """Clients that time out and leave must not keep the worker busy: their queued rows are skipped."""
    def metric(url, name):
        line = next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(name + " "))
        return float(line.split()[1])
    text = "a fairly long sentence about queues and servers that keeps going " * 20       # ~260 tokens: cut to 256
    with server("--model", minilm, "--max-batch-tokens", 300, "--auto-truncate") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"inputs": [text] * 32}).encode()
        socks = []
        for _ in range(10):                        # 320 rows, one forward each: seconds of work
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (port, len(body)) + body)
            socks.append(sock)
        time.sleep(0.5)
        for sock in socks:
            sock.close()
        deadline = time.monotonic() + 10
        while metric(url, "minibt_requests_in_flight") > 0:
            assert time.monotonic() < deadline, "abandoned requests still in flight after 10 s"
            time.sleep(0.1)
        rows = metric(url, "minibt_batch_rows_total")
        time.sleep(1.0)
        assert metric(url, "minibt_batch_rows_total") - rows <= 1    # the worker stopped on them (one forward may end)
        assert rows < 160, rows                                       # most of the 320 rows never ran
        assert 'status="499"' in httpx.get(url + "/metrics").text
        assert httpx.post(url + "/embed", json={"inputs": "still here"}).status_code == 200


def test_stalled_and_vanishing_bodies_are_bounded(minilm):
    """A client that stops mid-body gets 408 after --body-timeout (and cannot hold up a SIGTERM drain); one that
    disconnects mid-body costs nothing; the server answers everyone else throughout."""
    with server("--model", minilm, "--body-timeout", 1) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        head = b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n" \
               b"Content-Length: 40\r\n\r\n" % port
        gone = socket.create_connection(("127.0.0.1", port))
        gone.sendall(head + b'{"inputs": ')
        gone.close()
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(head + b'{"inputs": ')
        stalled.settimeout(10)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            reply += stalled.recv(4096)
        status, body = reply.split(b"\r\n", 1)[0], json.loads(reply.split(b"\r\n\r\n", 1)[1])
        assert status.startswith(b"HTTP/1.1 408") and body["error_type"] == "Timeout" and "1 s" in body["error"]
        stalled.close()
        again = socket.create_connection(("127.0.0.1", port))   # stalls too, then SIGTERM: the drain is bounded
        again.sendall(head + b'{"inputs": ')
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.monotonic() - t0 < 15
        again.close()
        proc.reader.join(10)                                     # every line the server wrote
        log = output(proc)
        assert "ClientDisconnect" not in log and "Traceback" not in log, log


def test_api_key(minilm_server):
    for scheme in ("bearer", "BEARER", "Bearer "):                              # the scheme is case-insensitive
        r = httpx.post(minilm_server + "/embed", json={"inputs": "a"}, headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, r.text
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(minilm_server + "/embed", json={"inputs": "a"}, headers=headers)
        assert r.status_code == 401 and r.json()["error_type"] == "Unauthorized" and "--api-key" in r.json()["error"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=minilm_server + "/v1", api_key="nope", max_retries=0).embeddings.create(
            input="a", model="mini")
    assert httpx.get(minilm_server + "/health").status_code == 200           # probes need no key


def test_32_concurrent_clients_get_their_own_vectors(minilm_server, mini):
    model, tok = mini
    rng = random.Random(0)
    requests = [[f"client {c} text {i}: " + sentence(rng, rng.choice((1, 3, 12, 40, 90)))
                 for i in range(rng.randint(1, 8))] for c in range(32)]
    got = [None] * 32
    barrier = threading.Barrier(32)

    def client(c):
        with httpx.Client(base_url=minilm_server, headers=AUTH, timeout=120) as h:
            barrier.wait()
            got[c] = h.post("/embed", json={"inputs": requests[c]})
    threads = [threading.Thread(target=client, args=(c,)) for c in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [t for texts in requests for t in texts]
    ref = minibt.embed(model, tok, flat)
    start = 0
    for c, texts in enumerate(requests):
        assert got[c].status_code == 200, got[c].text
        torch.testing.assert_close(torch.tensor(got[c].json()), ref[start:start + len(texts)], atol=1e-5, rtol=0)
        start += len(texts)


def test_sigterm_under_load_loses_no_accepted_request(minilm, mini):
    model, tok = mini
    rng = random.Random(1)
    n = 12
    requests = [[f"request {c}: " + sentence(rng, 60) for _ in range(8)] for c in range(n)]
    results = [None] * n
    with server("--model", minilm, "--max-batch-tokens", 512) as (url, proc):
        def client(c):
            try:
                results[c] = httpx.post(url + "/embed", json={"inputs": requests[c]}, timeout=300)
            except httpx.HTTPError as e:
                results[c] = e
        threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while True:                     # signal once every request is accepted (in flight or answered)
            text = httpx.get(url + "/metrics").text
            in_flight = int(next(line.split()[1] for line in text.splitlines()
                                 if line.startswith("minibt_requests_in_flight")))
            answered = sum(r is not None for r in results)
            if in_flight + answered >= n:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal it drained on
        with pytest.raises(httpx.ConnectError):
            httpx.post(url + "/embed", json={"inputs": "late"}, timeout=5)
    print("in flight at SIGTERM:", in_flight)
    assert in_flight > 0, "the load finished before SIGTERM: make it heavier"
    ref = minibt.embed(model, tok, [t for texts in requests for t in texts])
    for c in range(n):
        assert isinstance(results[c], httpx.Response) and results[c].status_code == 200, results[c]
        torch.testing.assert_close(torch.tensor(results[c].json()), ref[8 * c:8 * c + 8], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- cross-encoders

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
         *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
         *"the a fox dog cat runs jumps over under big small red blue query answer paris france capital city "
          "river bank money water is of what where who how why".split()]


def cross_encoder_folder(tiny, folder, num_labels):
    """A tiny random BertForSequenceClassification with a WordPiece vocabulary of its size, + transformers' tokenizer."""
    import copy

    import transformers
    _, ref = tiny("BertForSequenceClassification", num_labels=num_labels)
    ref = copy.deepcopy(ref)
    with torch.no_grad():                   # spread the random scores so that their order means something
        ref.classifier.weight.mul_(100.0)
    ref.save_pretrained(folder, safe_serialization=True)
    vocab = (VOCAB + [f"[unused{i}]" for i in range(99)])[:ref.config.vocab_size]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64,
                                                              "tokenizer_class": "BertTokenizer"}))
    return folder, ref, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def cross_encoder(tiny, tmp_path_factory):
    return cross_encoder_folder(tiny, tmp_path_factory.mktemp("cross-encoder"), 1)


def hf_logits(ref, hf_tok, query, docs):
    batch = hf_tok([query] * len(docs), docs, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        return ref(**batch).logits.float()


def test_rerank_and_predict_equal_transformers(cross_encoder):
    folder, ref, hf_tok = cross_encoder
    query = "what is the capital of france"
    docs = ["paris is the capital city of france", "the fox jumps over the dog", "money in the river bank",
            "a big red cat " * 20, "where"]
    want = hf_logits(ref, hf_tok, query, docs)[:, 0]
    with server("--model", folder, "--max-batch-tokens", 64, "--auto-truncate") as (url, _):
        c = httpx.Client(base_url=url, timeout=60)
        raw = c.post("/rerank", json={"query": query, "texts": docs, "raw_scores": True, "return_text": True}).json()
        assert [r["index"] for r in raw] == sorted(range(5), key=lambda i: -want[i])
        assert all(r["text"] == docs[r["index"]] for r in raw)
        torch.testing.assert_close(torch.tensor([r["score"] for r in raw]), want[[r["index"] for r in raw]],
                                   atol=1e-5, rtol=0)
        scored = c.post("/rerank", json={"query": query, "texts": docs}).json()
        torch.testing.assert_close(torch.tensor([r["score"] for r in sorted(scored, key=lambda r: r["index"])]),
                                   want.sigmoid(), atol=1e-5, rtol=0)
        assert "text" not in scored[0]
        inf = c.post("/v1/rerank", json={"query": query, "documents": docs, "top_n": 2,
                                         "return_documents": True}).json()
        assert [r["index"] for r in inf["results"]] == [r["index"] for r in raw[:2]]
        assert inf["results"][0]["document"] == docs[raw[0]["index"]]
        torch.testing.assert_close(inf["results"][0]["relevance_score"], want.sigmoid()[raw[0]["index"]].item(),
                                   atol=1e-5, rtol=0)
        pair = c.post("/predict", json={"inputs": [query, docs[0]], "raw_scores": True}).json()
        assert pair[0]["label"] == "LABEL_0" and abs(pair[0]["score"] - want[0].item()) < 1e-5
        many = c.post("/predict", json={"inputs": [[query, d] for d in docs[:3]]}).json()
        torch.testing.assert_close(torch.tensor([p[0]["score"] for p in many]), want[:3].sigmoid(), atol=1e-5, rtol=0)
        r = c.post("/embed", json={"inputs": "a"})
        assert r.status_code == 400 and "sentence-embedding" in r.json()["error"]
        r = c.post("/rerank", json={"query": "", "texts": docs})
        assert r.status_code == 422 and "`query`" in r.json()["error"]
        assert c.get("/info").json()["model_type"]["reranker"]["id2label"] == {"0": "LABEL_0"}


# ------------------------------------------------------------------------------- in-process: batching, 429, 424

def test_queued_requests_share_one_forward_and_keep_their_rows(mini):
    model, tok = mini
    texts = [["one"], ["two words here", "three", "a somewhat longer fourth text for the batch"], ["five", "six"]]
    svc = serve.Service(model, tok, max_batch_tokens=16384, max_client_batch_size=32, max_concurrent_requests=8,
                        api_key=None, auto_truncate=False, model_id=None, payload_limit=serve.PAYLOAD_LIMIT)

    async def go():
        loop = asyncio.get_running_loop()
        jobs = [serve.Job(tok.encode(t), loop, loop.create_future()) for t in texts]
        for job in jobs:                        # all queued before the worker looks: one round, one forward
            svc.worker.queue.put(job)
        svc.worker.start()
        out = [await job.future for job in jobs]
        svc.worker.stop()
        return out
    out = asyncio.run(go())
    assert svc.worker.stats["batches"] == 1 and svc.worker.stats["batch_rows"] == 6
    ref = minibt.embed(model, tok, [t for ts in texts for t in ts])
    torch.testing.assert_close(torch.nn.functional.normalize(torch.cat(out), dim=-1), ref, atol=1e-5, rtol=0)


def test_overload_429_and_backend_failure_424(mini):
    model, tok = mini
    svc = serve.Service(model, tok, max_batch_tokens=16384, max_client_batch_size=32, max_concurrent_requests=1,
                        api_key=None, auto_truncate=False, model_id=None, payload_limit=serve.PAYLOAD_LIMIT)
    gate, real = threading.Event(), svc.worker._forward

    def gated(encs, skips):
        gate.wait(30)
        return real(encs, skips)

    async def go():
        svc.worker._forward = gated
        svc.worker.start()
        transport = httpx.ASGITransport(app=svc.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            first = asyncio.create_task(c.post("/embed", json={"inputs": "held"}))
            while svc.in_flight == 0:
                await asyncio.sleep(0.01)
            second = await c.post("/embed", json={"inputs": "refused"})
            gate.set()
            first = await first

            def broken(encs, skips):
                raise RuntimeError("device lost")
            svc.worker._forward = broken
            failed = await c.post("/embed", json={"inputs": "fails"})
            svc.worker._forward = real
            after = await c.post("/embed", json={"inputs": "fine again"})
        svc.worker.stop()
        return first, second, failed, after
    first, second, failed, after = asyncio.run(go())
    assert second.status_code == 429 and second.json()["error_type"] == "Overloaded"
    assert "--max-concurrent-requests" in second.json()["error"]
    assert first.status_code == 200 and after.status_code == 200
    assert failed.status_code == 424 and "device lost" in failed.json()["error"]


def test_a_bug_of_ours_is_a_counted_json_500_and_the_server_goes_on(mini, caplog):
    model, tok = mini
    svc = serve.Service(model, tok, max_batch_tokens=16384, max_client_batch_size=32, max_concurrent_requests=8,
                        api_key=None, auto_truncate=False, model_id=None, payload_limit=serve.PAYLOAD_LIMIT)

    async def broken(timing):
        raise KeyError("a bug")
    svc.models = broken                                     # /v1/models stands in for any route with a bug

    async def go():
        svc.worker.start()
        transport = httpx.ASGITransport(app=svc.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            bad, good, metrics = await c.get("/v1/models"), await c.post("/embed", json={"inputs": "a"}), \
                await c.get("/metrics")
        svc.worker.stop()
        return bad, good, metrics
    bad, good, metrics = asyncio.run(go())
    assert bad.status_code == 500 and bad.json() == {"error": "internal error: KeyError", "error_type": "Internal"}
    assert good.status_code == 200 and 'route="/v1/models",status="500"} 1' in metrics.text
    assert "a bug" in caplog.text                              # the traceback goes to the server log


def test_import_minibt_does_not_import_the_server_stack():
    code = "import sys, minibt; print(any(m.split('.')[0] in ('starlette', 'uvicorn') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_predict_two_labels_softmax_in_process(tiny, tmp_path):
    folder, ref, hf_tok = cross_encoder_folder(tiny, tmp_path, 2)
    model, tok = minibt.from_hub(folder), minibt.load_tokenizer(folder)
    svc = serve.Service(model, tok, max_batch_tokens=64, max_client_batch_size=4, max_concurrent_requests=8,
                        api_key=None, auto_truncate=False, model_id=None, payload_limit=serve.PAYLOAD_LIMIT)
    texts = ["the fox runs", "paris is a city", "what is money"]
    with torch.inference_mode():
        want = ref(**hf_tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)

    async def go():
        svc.worker.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.asgi()), base_url="http://t") as c:
            out = [await c.post("/predict", json={"inputs": x}) for x in (texts, texts[0], texts * 2)]
            out.append(await c.post("/rerank", json={"query": "q", "texts": ["a"]}))
        svc.worker.stop()
        return out
    many, one, too_many, rerank = asyncio.run(go())
    for row, w in zip(many.json(), want):
        assert [p["score"] for p in row] == sorted((p["score"] for p in row), reverse=True)
        torch.testing.assert_close(torch.tensor([p["score"] for p in sorted(row, key=lambda p: p["label"])]), w,
                                   atol=1e-5, rtol=0)
    assert {p["label"] for p in one.json()} == {"LABEL_0", "LABEL_1"}
    assert too_many.status_code == 413 and "--max-client-batch-size" in too_many.json()["error"]
    assert rerank.status_code == 400 and "2 labels" in rerank.json()["error"]


def test_vectors_render_as_float32_with_or_without_orjson(monkeypatch):
    """Both writers give back exactly the float32 values (orjson: float32's shortest decimals; json: float64 digits)."""
    vecs = torch.nn.functional.normalize(torch.randn(3, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    vecs[0, 0] = 1e-30                                     # tiny and huge magnitudes too
    vecs[1, 1] = -3.5e30
    body = {"data": [{"embedding": row, "index": i} for i, row in enumerate(serve.rows(vecs))], "n": 3}
    fast = serve.render(body)
    monkeypatch.setattr(serve, "orjson", None)
    slow = serve.render(body)
    for text in (fast, slow):
        got = json.loads(text)
        assert got["n"] == 3 and [d["index"] for d in got["data"]] == [0, 1, 2]
        assert torch.equal(torch.tensor([d["embedding"] for d in got["data"]], dtype=torch.float32), vecs)
    assert len(fast) < 0.75 * len(slow)                    # shortest float32 decimals, not float64 ones


# ------------------------------------------------------------------------------- the command line and the app's setup

def test_missing_config_json_is_one_clear_cli_error(tmp_path, capsys):
    """A folder without config.json ends `minibt serve` (and `python -m minibt.tools.serve`) with one line and
    exit code 2, like every other command-line error: no traceback."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "minibt", "serve", "--model", str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stdout == f"minibt serve: loading {tmp_path} ...\n", r.stderr   # no banner
    assert r.stderr.strip() == f"minibt: error: {tmp_path}: no config.json"
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == f"minibt: error: {tmp_path}: no config.json"


def test_classifier_width_is_the_models_num_labels(tiny, tmp_path):
    """A config.json with num_labels and no id2label: the model has 3 outputs, and so has what serve answers
    (its width once came from id2label alone: 2, and the worker died writing 3 scores into 2 places)."""
    folder, ref, hf_tok = cross_encoder_folder(tiny, tmp_path, 3)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("id2label", "label2id")} | {"num_labels": 3}
    (folder / "config.json").write_text(json.dumps(config))
    model, tok = minibt.from_hub(folder), minibt.load_tokenizer(folder)
    svc = serve.Service(model, tok, max_batch_tokens=64, max_client_batch_size=4, max_concurrent_requests=8,
                        api_key=None, auto_truncate=False, model_id=None, payload_limit=serve.PAYLOAD_LIMIT)
    texts = ["the fox runs", "paris is a city", "what is money"]          # (two strings would be one pair)
    with torch.inference_mode():
        want = ref(**hf_tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)

    async def go():
        svc.worker.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.asgi()), base_url="http://t") as c:
            out = await asyncio.wait_for(c.post("/predict", json={"inputs": texts}), 60), await c.get("/info")
        svc.worker.stop()
        return out
    predict, info = asyncio.run(go())
    assert predict.status_code == 200, predict.text
    for row, w in zip(predict.json(), want):
        torch.testing.assert_close(torch.tensor([p["score"] for p in sorted(row, key=lambda p: p["label"])]), w,
                                   atol=1e-5, rtol=0)
    assert info.json()["model_type"]["classifier"]["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}


def test_keep_memory_only_when_asked_and_request_seconds_counted(mini, monkeypatch):
    """The glibc setting is process-wide (kernels/malloc.py): `app()` leaves it alone unless keep_memory=True (the
    `minibt serve` command asks). /metrics adds up each request's time from arrival to answer."""
    from minibt.tools import serve_engine
    model, tok = mini
    asked = []
    monkeypatch.setattr(serve_engine, "keep_freed_memory", lambda: asked.append(True))

    async def go(keep_memory):
        svc = serve.Service(model, tok, max_batch_tokens=16384, max_client_batch_size=32, max_concurrent_requests=8,
                            api_key=None, auto_truncate=False, model_id=None, payload_limit=serve.PAYLOAD_LIMIT,
                            keep_memory=keep_memory)
        svc.worker.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.asgi()), base_url="http://t") as c:
            await c.post("/embed", json={"inputs": "a"})
            await c.get("/health")
            metrics = (await c.get("/metrics")).text
        svc.worker.stop()
        return metrics
    metrics = asyncio.run(go(False))
    assert asked == []
    seconds = float(next(x for x in metrics.splitlines() if x.startswith("minibt_request_seconds_total ")).split()[1])
    assert seconds > 0
    asyncio.run(go(True))
    assert asked == [True]
