"""The connections under `minibt serve` (the command only; app() users bring their own server): the socket, bound
before the model loads, and uvicorn's HTTP protocol with the bounds a local service needs that uvicorn lacks: a
header timeout and a connection limit kept below the open-file limit, so idle and half-open sockets cannot starve
/health. Imported by tools/serve.py's run(), after uvicorn."""
from __future__ import annotations

import contextlib
import http
import json
import logging
import math
import socket
import time

from ..errors import InputError

FD_RESERVE = 64                      # files the process keeps for itself (model files, logs, the worker)


def raw_answer(transport, status: int, message: str, kind: str) -> None:
    """An error answer written straight to a connection that has no request the app could answer; then closed."""
    body = json.dumps({"error": message, "error_type": kind}).encode()
    transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n%s" % (status, http.HTTPStatus(status).phrase.encode(), len(body), body))
    transport.close()


class HeaderGuard:
    """The bounds `guarded` adds to uvicorn's HTTP protocol (a mixin before it; class attributes header_timeout and
    max_connections)."""

    header_timeout: float
    max_connections: int

    def connection_made(self, transport):
        super().connection_made(transport)
        self.partial, self.timer = False, None
        self.arm()
        if len(self.connections) > self.max_connections:
            # (one already closing stays in the set until its close has run: not picked twice)
            waiting = [c for c in self.connections
                       if c is not self and c.waiting() and not c.transport.is_closing()]
            if waiting:
                min(waiting, key=lambda c: c.since).expire(
                    503, f"closed to make room for a new connection (--max-connections {self.max_connections}) "
                         "before this request's headers were complete")
            else:
                raw_answer(transport, 503, f"every one of the server's {self.max_connections} connections is "
                                           "running a request: try again", "Overloaded")

    def waiting(self) -> bool:
        """No request running: before the first one's headers are complete, or after an answer."""
        return self.cycle is None or self.cycle.response_complete

    def arm(self):
        if self.timer is not None:
            self.timer.cancel()
        self.since = time.monotonic()
        self.timer = self.loop.call_later(self.header_timeout, self.expire)

    def data_received(self, data):
        if self.waiting():                      # bytes of a request whose headers are not all here yet
            if self.timer is None:
                self.arm()
            self.partial = True
        super().data_received(data)

    def expire(self, status=408, why=None):
        """Close a connection with no request running; one that has sent part of a request is told why."""
        if self.timer is not None:
            self.timer.cancel()                 # when called to make room, not by the timer
        self.timer = None
        if not self.waiting() or self.transport.is_closing():
            return                              # its request is running: the body has --body-timeout
        if self.partial:
            why = why or f"the request's headers did not arrive within {self.header_timeout:g} s (--header-timeout)"
            raw_answer(self.transport, status, why, "Timeout" if status == 408 else "Overloaded")
        else:
            self.transport.close()

    def on_response_complete(self):
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.partial, self.since = None, False, time.monotonic()
        super().on_response_complete()

    def connection_lost(self, exc):
        if self.timer is not None:
            self.timer.cancel()
        super().connection_lost(exc)


def guarded(base, header_timeout: float, max_connections: int):
    """uvicorn's HTTP protocol class `base` with the two bounds a local service needs that uvicorn lacks (nginx has
    both): a request's headers must be complete within header_timeout seconds of the connection opening or of the
    request's first byte (then 408 and closed; a connection that sent nothing is closed), and at most
    max_connections are open: one more closes the longest-waiting connection with no request running, or is
    answered 503 when every one is running a request. So idle and half-open sockets cannot starve /health.
    Idle kept-alive connections are closed by uvicorn (--keep-alive-timeout)."""
    return type("Guarded", (HeaderGuard, base), {"header_timeout": header_timeout, "max_connections": max_connections})


def connection_limit(wanted: int) -> int:
    """--max-connections, kept FD_RESERVE below the open-file limit (raised towards the hard limit if need be):
    past that limit accept() fails and every client, /health's too, waits."""
    try:
        import resource
    except ImportError:                             # not on Unix
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    if soft < wanted + FD_RESERVE:
        target = wanted + FD_RESERVE if hard == resource.RLIM_INFINITY else min(wanted + FD_RESERVE, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(1, min(wanted, soft - FD_RESERVE))


class AcceptLimitLog(logging.Filter):
    """asyncio logs a traceback for each accept() that finds no free file (on a connection flood, before the
    `guarded` limit has closed idle connections to make room: it retries a second later), as many as the listen
    backlog at once. This keeps one line a minute of them."""

    def __init__(self):
        super().__init__()
        self.last = -math.inf

    def filter(self, record) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        if time.monotonic() - self.last < 60:
            return False
        self.last = time.monotonic()
        record.msg, record.args, record.exc_info, record.exc_text = (
            "minibt serve: out of open files accepting connections; idle ones are closed to make room", (), None, None)
        return True


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (a taken port is one line at once, not after minutes of
    loading) and listening only once it is ready (until then a client is refused, not left waiting)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"--host {host!r}: {getattr(e, 'strerror', None) or e}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {where}: {e.strerror or e} (--host, --port)") from None
    return sock
