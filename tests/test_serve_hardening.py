"""minibt serve as a local service (issue 27): JSON content type, the Host allow-list on loopback, header and
keep-alive timeouts, the connection limit, one admission and bounded answers for every POST route, the API key, and
the options checked at start-up. Real servers on 127.0.0.1 (tests/test_serve.py's `server`) and the in-process app;
after each refusal a good request is still answered."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import minibt  # noqa: E402
from minibt.errors import InputError  # noqa: E402
from minibt.tools import serve, serve_net  # noqa: E402
from test_serve import cross_encoder_folder, output, server  # noqa: E402


@pytest.fixture(scope="module")
def mini(minilm):
    return minibt.from_hub(minilm, head="base"), minibt.load_tokenizer(minilm)


def service(model, tok, **kw):
    options = dict(max_batch_tokens=16384, max_client_batch_size=32, max_concurrent_requests=8, api_key=None,
                   auto_truncate=False, model_id=None, payload_limit=serve.PAYLOAD_LIMIT)
    return serve.Service(model, tok, **{**options, **kw})


def in_process(svc, go):
    """go(client) against svc's app, its worker running."""
    async def main():
        svc.worker.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.asgi()), base_url="http://t",
                                         timeout=60) as c:
                return await go(c)
        finally:
            svc.worker.stop()
    return asyncio.run(main())


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def read_response(sock, timeout: float = 10) -> tuple[int, dict | None]:
    """One HTTP response from a raw socket: (status, JSON body); (0, None) if the server closed without answering."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body)


def closed_within(sock, seconds: float) -> float:
    """Seconds until the server closes `sock` (reading whatever it sends first); fails after `seconds`."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    while sock.recv(65536):
        pass
    return time.monotonic() - t0


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(next(x for x in text.splitlines() if x.startswith(name + " ")).split()[1])


def batches(url: str) -> float:
    return metric(url, "minibt_batches_total")


def rss(pid: int) -> int:
    """Resident memory of process `pid` in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


# ------------------------------------------------------------------------------------------------- content type

POST_ROUTES = ("/embed", "/v1/embeddings", "/embeddings", "/tokenize", "/rerank", "/v1/rerank", "/predict")
NOT_JSON = (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
            "application/jsonp", "")


def test_post_routes_need_a_json_content_type(mini):
    """A page on another site can POST text/plain, a form or multipart to a loopback server without the browser
    asking first (TEI answers those 415): every POST route refuses them before reading or computing anything."""
    svc = service(*mini)
    body = json.dumps({"inputs": "a", "input": "a", "query": "q", "texts": ["a"]}).encode()

    async def go(c):
        refused = {}
        for route in POST_ROUTES:
            for kind in NOT_JSON:
                headers = {} if kind is None else {"Content-Type": kind}
                refused[route, kind] = await c.post(route, content=body, headers=headers)
        good = await c.post("/embed", content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
        return refused, good
    refused, good = in_process(svc, go)
    for (route, kind), r in refused.items():
        assert r.status_code == 415, (route, kind, r.text)
        err = r.json()
        assert err["error_type"] == "UnsupportedMediaType" and "Content-Type: application/json" in err["error"]
        assert ("no Content-Type" if kind is None else repr(kind)) in err["error"]
    assert good.status_code == 200 and len(good.json()) == 1
    assert svc.worker.stats["batches"] == 1                      # only the good request ran the model


# ------------------------------------------------------------------------------- admission and bounded answers

class HeldTokenizer:
    """The served tokenizer, but encode() of a long text waits for `gate` (it runs on a thread: over
    serve.TOKENIZE_INLINE_CHARS characters)."""

    def __init__(self, tok):
        self.tok, self.gate, self.entered = tok, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, texts, **kwargs):
        if sum(len(t) for t in texts if isinstance(t, str)) > serve.TOKENIZE_INLINE_CHARS:
            self.entered.set()
            self.gate.wait(30)
        return self.tok.encode(texts, **kwargs)


def test_tokenize_holds_a_slot_like_every_post_route(mini):
    """/tokenize once bypassed --max-concurrent-requests (three 2 MB bodies at once: no 429, +1.9 GB): a request
    being tokenised holds one of the slots, on every POST route."""
    model, tok = mini
    svc = service(model, tok, max_concurrent_requests=1)
    held = svc.tok = HeldTokenizer(tok)
    big = "held while it is tokenised " * 1000

    async def go(c):
        first = asyncio.create_task(c.post("/tokenize", json={"inputs": big}))
        while svc.in_flight == 0:
            await asyncio.sleep(0.01)
        assert held.entered.is_set()
        during = [await c.post("/tokenize", json={"inputs": "small"}), await c.post("/embed", json={"inputs": "a"}),
                  await c.post("/v1/embeddings", json={"input": "a"})]
        held.gate.set()
        first = await first
        return first, during, [await c.post("/tokenize", json={"inputs": "small"}),
                               await c.post("/embed", json={"inputs": "a"})]
    first, during, after = in_process(svc, go)
    for r in during:
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded", r.text
        assert "--max-concurrent-requests 1" in r.json()["error"]
    assert first.status_code == 200 and [t["id"] for t in first.json()[0]] == tok.encode([big])[0].ids
    assert [r.status_code for r in after] == [200, 200] and svc.in_flight == 0


def test_tokenize_answer_is_bounded(mini):
    """One /tokenize once answered 69 MB for a 2 MB body: past serve.TOKENIZE_MAX_TOKENS tokens (over all inputs)
    it is a short 413 naming the limit."""
    svc = service(*mini)
    half = "a " * (serve.TOKENIZE_MAX_TOKENS // 2)

    async def go(c):
        return [await c.post("/tokenize", json={"inputs": body}) for body in ("a " * serve.TOKENIZE_MAX_TOKENS,
                                                                               [half, half], "a " * 1000)]
    one, two, fine = in_process(svc, go)
    for r in (one, two):
        assert r.status_code == 413 and len(r.content) < 500, r.text
        assert f"limit of {serve.TOKENIZE_MAX_TOKENS} tokens" in r.json()["error"] and "`inputs`" in r.json()["error"]
    assert fine.status_code == 200 and len(fine.json()[0]) == 1002          # [CLS] + 1000 + [SEP]


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, texts, **kwargs):
        self.calls.append(list(texts))
        return self.tok.encode(texts, **kwargs)


def test_rerank_checks_the_query_alone_before_pairing_it(tiny, tmp_path):
    """An over-long query was paired with each document and all of them tokenised before the length check (1.4 GB
    for a 200 KB body): the query is tokenised once, alone, and refused (even with truncation) before any pair."""
    folder, ref, hf_tok = cross_encoder_folder(tiny, tmp_path, 1)
    model, tok = minibt.from_hub(folder), minibt.load_tokenizer(folder)
    svc = service(model, tok, max_batch_tokens=64)
    counting = svc.tok = CountingTokenizer(tok)
    query = "what is the capital of france " * 2000
    docs = ["paris is the capital city of france"] * 32

    async def go(c):
        refused = [await c.post("/rerank", json={"query": query, "texts": docs}),
                   await c.post("/rerank", json={"query": query, "texts": docs, "truncate": True}),
                   await c.post("/v1/rerank", json={"query": query, "documents": docs})]
        calls = list(counting.calls)
        good = await c.post("/rerank", json={"query": "what is the capital of france", "texts": docs[:2]})
        return refused, calls, good
    refused, calls, good = in_process(svc, go)
    for r in refused:
        assert r.status_code == 413, r.text
        assert "`query` is" in r.json()["error"] and "at most 64 tokens" in r.json()["error"]
    assert len(calls) == 3 and all(c == [query] for c in calls)          # the query alone, once each; no pairs
    assert good.status_code == 200 and len(good.json()) == 2


# -------------------------------------------------------------------------------------- the API key and options

@pytest.mark.parametrize("key,words", [("", "api_key is empty"), (" key", "white space"), ("k\ney", "control")])
def test_unusable_api_keys_are_refused(mini, key, words):
    """An empty key once let an empty `Bearer` through: refused at start-up, as are keys no header can carry."""
    with pytest.raises(InputError, match=words):
        serve.app(*mini, api_key=key)


def test_non_ascii_api_key_matches_its_utf8_bytes(mini):
    key = "clé-ключ-🔑"
    svc = service(*mini, api_key=key)

    async def go(c):
        out = {}
        for name, value in [("right", b"Bearer " + key.encode()), ("empty", b"Bearer "), ("bare", b"Bearer"),
                            ("latin1", b"Bearer cl\xe9-" + "ключ-🔑".encode()),       # é as one latin-1 byte
                            ("near", b"Bearer " + "clé-ключ-🔒".encode())]:
            out[name] = await c.post("/embed", json={"inputs": "a"}, headers={"Authorization": value})
        return out
    out = in_process(svc, go)
    assert out["right"].status_code == 200, out["right"].text
    for name in ("empty", "bare", "latin1", "near"):
        assert out[name].status_code == 401 and "--api-key" in out[name].json()["error"], name


BAD_OPTIONS = [  # (flags, the words of the one line)
    (["--port", "70000"], "--port 70000: must be an integer from 0 to 65535"),
    (["--port", "-1"], "--port -1: must be an integer from 0 to 65535"),
    (["--body-timeout", "nan"], "--body-timeout nan: must be a finite number > 0"),
    (["--body-timeout", "-1"], "--body-timeout -1.0: must be a finite number > 0"),
    (["--header-timeout", "inf"], "--header-timeout inf: must be a finite number > 0"),
    (["--keep-alive-timeout", "-0.5"], "--keep-alive-timeout -0.5: must be a finite number >= 0"),
    (["--max-concurrent-requests", "0"], "--max-concurrent-requests 0: must be an integer >= 1"),
    (["--max-connections", "0"], "--max-connections 0: must be an integer >= 1"),
    (["--max-batch-tokens", "-5"], "--max-batch-tokens -5: must be an integer >= 1"),
    (["--api-key", ""], "--api-key is empty"),
]


@pytest.mark.parametrize("flags,words", BAD_OPTIONS, ids=[" ".join(f) for f, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_before_anything_loads(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", "/nonexistent/never-read", *flags])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.count("\n") == 1, err     # no "loading" line: nothing loaded
    assert err.startswith("minibt: error: ") and words in err, err


def test_a_taken_port_is_one_line_before_loading(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            serve.main(["--model", "/nonexistent/never-read", "--port", str(port)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.count("\n") == 1, err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err and "--port" in err


def test_library_options_are_checked(mini):
    for kw, words in [({"body_timeout": float("nan")}, "body_timeout=nan"), ({"payload_limit": 0}, "payload_limit=0"),
                      ({"max_concurrent_requests": 1.5}, "max_concurrent_requests=1.5"),
                      ({"max_client_batch_size": True}, "max_client_batch_size=True")]:
        with pytest.raises(InputError, match=words.replace(".", r"\.")):
            serve.app(*mini, **kw)


def test_help_shows_the_defaults_of_serves_limits():
    from minibt.tools.cli import parser
    sub = next(a for a in parser()._actions if a.dest == "command").choices["serve"]
    helps = {a.option_strings[0]: sub._get_formatter()._expand_help(a) for a in sub._actions if a.help}
    for flag, default in [("--port", 8080), ("--max-batch-tokens", 16384), ("--max-client-batch-size", 32),
                          ("--max-concurrent-requests", 512), ("--max-connections", 1024), ("--body-timeout", 30.0),
                          ("--header-timeout", 10.0), ("--keep-alive-timeout", 5.0)]:
        assert f"default {default})" in helps[flag], (flag, helps[flag])


# ------------------------------------------------------------------------------------------- real servers

def test_host_allow_list_timeouts_and_connection_limit(minilm):
    """One keyless server on 127.0.0.1 with short limits: only its own Host names are answered (DNS rebinding);
    half-sent headers get 408 and a silent connection is closed after --header-timeout; an idle kept-alive one
    after --keep-alive-timeout; with every connection running a request one more gets 503. A line when loading
    starts and when ready; one access-log line per request. The server answers after each."""
    with server("--model", minilm, "--header-timeout", 1, "--keep-alive-timeout", 1, "--body-timeout", 3,
                "--max-connections", 3) as (url, proc):
        port = port_of(url)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
            assert httpx.get(url + "/health", headers={"Host": host}, timeout=10).status_code == 200, host
        before = batches(url)
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}"):
            r = httpx.post(url + "/embed", json={"inputs": "a"}, headers={"Host": host}, timeout=10)
            assert r.status_code == 403 and r.json()["error_type"] == "Forbidden", (host, r.text)
            assert repr(host) in r.json()["error"] and "DNS rebinding" in r.json()["error"]
        with socket.create_connection(("127.0.0.1", port)) as s:              # HTTP/1.0 without a Host
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert read_response(s)[0] == 403
        assert batches(url) == before                                           # nothing was computed

        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Ty" % port)
        silent = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        status, body = read_response(half)
        assert status == 408 and "--header-timeout" in body["error"] and time.monotonic() - t0 < 5
        assert closed_within(half, 5) < 5 and closed_within(silent, 5) < 5
        half.close()
        silent.close()

        with socket.create_connection(("127.0.0.1", port)) as kept:             # kept alive, then idle
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
            assert read_response(kept)[0] == 200
            assert closed_within(kept, 5) < 5
        with socket.create_connection(("127.0.0.1", port)) as kept:             # kept alive, then half a request
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
            assert read_response(kept)[0] == 200
            kept.sendall(b"GET /health HTTP/1.1\r\n")
            assert read_response(kept)[0] == 408

        running = []                        # headers complete, body stalled: each a running request
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 40\r\n\r\n{\"inputs\": " % port)
            running.append(s)
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port)) as extra:
            status, body = read_response(extra)
            assert status == 503 and "3 connections" in body["error"]
        for s in running:                   # --body-timeout frees them
            assert read_response(s)[0] == 408
            s.close()
        r = httpx.post(url + "/embed", json={"inputs": "still here"}, timeout=30)
        assert r.status_code == 200
        time.sleep(0.3)
        log = output(proc)
    loading = log.index("minibt serve: loading ")
    assert loading < log.index(f"ready on http://127.0.0.1:{port}")
    assert "GET /health 200 " in log and "POST /embed 403 " in log and "POST /embed 200 " in log
    assert "Traceback" not in log, log


def test_a_busy_server_refuses_before_reading_a_body(minilm):
    """The 429 once came only after a request's body was read and parsed: many open connections each sending a body
    just under the 2 MB limit grew the server by gigabytes. A POST takes its slot before its body is read: with every
    slot held by a request still sending its body, each further POST is refused 429 at once, its body unread (the
    server does not grow by the bytes sent), while the held ones get 408 at --body-timeout; then a good request is
    answered."""
    slots, extras, size = 2, 24, serve.PAYLOAD_LIMIT - 1000
    head = (b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n")
    with server("--model", minilm, "--max-concurrent-requests", slots, "--body-timeout", 10) as (url, proc):
        port = port_of(url)
        held = []
        for _ in range(slots):                  # headers complete, body stalled: each holds a slot while it is read
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head % (port, 40) + b'{"inputs": ')
            held.append(s)
        t0 = time.monotonic()
        while metric(url, "minibt_requests_in_flight") < slots:
            assert time.monotonic() - t0 < 5, "requests reading their body hold no slot"
            time.sleep(0.05)

        before, t1 = rss(proc.pid), time.monotonic()
        refused = []
        for _ in range(extras):                 # each announces a body just under the limit and sends all but 1000 B
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head % (port, size) + b'{"inputs": "' + b"a" * (size - 1012))
            refused.append(s)
        time.sleep(0.5)
        grown = rss(proc.pid) - before
        for s in refused:
            status, body = read_response(s, timeout=5)
            assert status == 429 and body["error_type"] == "Overloaded", body
            assert f"--max-concurrent-requests {slots}" in body["error"]
        assert time.monotonic() - t1 < 5                                    # at once, not at --body-timeout
        assert grown < extras * size / 4, f"the server grew {grown / 1e6:.1f} MB on {extras} refused bodies"
        for s in refused:
            s.close()

        for s in held:                          # --body-timeout frees their slots
            status, body = read_response(s, timeout=15)
            assert status == 408 and "did not arrive within 10 s" in body["error"], body
            s.close()
        assert metric(url, "minibt_requests_in_flight") == 0
        r = httpx.post(url + "/embed", json={"inputs": "still here"}, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1
        assert "Traceback" not in output(proc)
    print(f"server grew {grown / 1e6:.1f} MB on {extras} refused bodies of {size} B")


def test_idle_and_half_open_sockets_cannot_starve_health(minilm):
    """300 half-open and idle sockets against a server whose open-file limit is 256 once made /health time out:
    --max-connections is kept below the limit and each new connection closes the longest-waiting idle one."""
    import resource

    def low_file_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    with server("--model", minilm, "--header-timeout", 60, preexec_fn=low_file_limit) as (url, proc):
        port = port_of(url)
        assert f"at most {256 - serve_net.FD_RESERVE} connections" in output(proc)
        socks = []
        try:
            for i in range(300):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                if i % 2:
                    s.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port)
                socks.append(s)
            t0 = time.monotonic()
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            assert time.monotonic() - t0 < 5
            r = httpx.post(url + "/embed", json={"inputs": "still here"}, timeout=30)
            assert r.status_code == 200
            status, body = read_response(socks[1])          # among the oldest: closed to make room, and told so
            assert status == 503 and f"--max-connections {256 - serve_net.FD_RESERVE}" in body["error"]
            assert closed_within(socks[0], 5) < 5
        finally:
            for s in socks:
                s.close()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert "Traceback" not in output(proc)          # asyncio's accept() errors: one line a minute at most


def test_with_a_key_any_host_and_a_non_ascii_key_over_http(minilm):
    """With --api-key (here non-ASCII, sent as its UTF-8 bytes) the Host is not limited; --no-access-log is quiet."""
    key = "clé-ключ"
    with server("--model", minilm, "--api-key", key, "--no-access-log") as (url, proc):
        right = {"Authorization": b"Bearer " + key.encode(), "Host": b"embeddings.internal"}
        assert httpx.post(url + "/embed", json={"inputs": "a"}, headers=right, timeout=30).status_code == 200
        for value in (b"Bearer", b"Bearer wrong", b"Bearer cl\xe9-" + "ключ".encode()):
            r = httpx.post(url + "/embed", json={"inputs": "a"}, headers={"Authorization": value}, timeout=30)
            assert r.status_code == 401, r.text
        assert httpx.post(url + "/embed", json={"inputs": "a"}, headers=right, timeout=30).status_code == 200
        time.sleep(0.3)
        assert "POST /embed" not in output(proc)
