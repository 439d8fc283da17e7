"""Serving a Prometheus registry on ``/metrics`` from a background thread, fit for a shared
network: optional TLS and basic auth (a :class:`~ugro.common.web_config.WebConfig`), and bounds
on what one client can hold.

prometheus_client's own server does the TLS handshake in its accepting thread, so one client
that connects and sends nothing stops every scrape; and it lets a client keep a connection (and
a thread) forever. Here each connection is answered on a thread of its own, handshake included,
within these bounds:

* At most ``MAX_CONNECTIONS`` connections hold a slot at once. When a new one arrives and every
  slot is taken, the oldest connection that is still in its TLS handshake or still sending its
  request head is cut to make room (counted as ``evicted``); only when all of them are already
  being answered is the oldest of those cut. A scrape takes milliseconds, so the oldest of 32
  open connections is the slowest client: a flood of silent or trickling clients (slowloris,
  half-open TLS) cannot lock Prometheus out; it would have to open 32 new connections within
  the few milliseconds of one scrape's handshake, and even that cannot cut a scrape that is
  already being answered. (Refusing newcomers instead would let 32 slow clients, one every
  ``REQUEST_DEADLINE_SECONDS``, block every scrape; reading every request head before giving it
  a thread would need an event loop for TLS, which this module avoids.)
* A cut connection's thread ends as soon as its blocked read or write fails; until it has, it
  still counts against ``MAX_THREADS`` (twice the slots). A connection arriving when that many
  threads run is closed at once (``refused_busy``): so threads, their stacks and the tables
  below are bounded whatever clients do.
* A connection still open ``REQUEST_DEADLINE_SECONDS`` after it was accepted is cut, however
  slowly its client trickles bytes or reads the response; one silent for ``IDLE_SECONDS`` (no
  byte in, or none of the response taken) is dropped sooner.
* The request line may hold ``MAX_REQUEST_LINE_BYTES`` (a longer one gets 414) and the whole
  request head ``MAX_REQUEST_HEAD_BYTES`` (more gets 431); a body is never read.
* With basic auth, one bcrypt runs at a time (a tenth of a second at cost 10, over a second at
  14).
  Credentials that passed before skip the queue of unknown ones (a scraper waits for one bcrypt
  at most, however many wrong passwords arrive); at most ``MAX_WAITING_PASSWORD_CHECKS``
  unknown ones wait, more get 503 at once, so wrong passwords cannot take every thread.
  ``close()`` skips the checks not begun and waits for the one in progress: an interpreter that
  exits while a thread is inside bcrypt can abort.
* Plain HTTP sent to a TLS endpoint gets a one-line 400 in plain text (what Go's servers answer,
  so ``curl`` says why); a TLS handshake sent to a plain endpoint is closed at once. After an
  error answer or a refused client certificate, what the client still sends is read (a bounded
  amount) before closing, so that it gets the 4xx or the TLS alert saying why, not a reset.

A scrape needs none of this, so none of it touches Prometheus. Whatever a client does is counted
(:class:`EndpointCounts`) and logged at debug level, never raised: the endpoint lives inside a
training process.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from .web_config import BasicAuth, WebConfig

MAX_CONNECTIONS = 32
# Threads of cut connections still unwinding count too, up to this many threads in all.
MAX_THREADS = 2 * MAX_CONNECTIONS
REQUEST_DEADLINE_SECONDS = 10.0
# A silent client (no bytes for this long, handshake included) is dropped sooner.
IDLE_SECONDS = 5.0
# How long close() lets responses being written finish.
CLOSE_WAIT_SECONDS = 2.0
# Password checks of unknown credentials that may wait for the one being made (one bcrypt at a
# time); more get 503 at once rather than a thread each.
MAX_WAITING_PASSWORD_CHECKS = 4
# How long close() waits, after cutting every connection, for a password check in progress (a
# bcrypt of cost 14 takes one to two seconds): a process must not exit in the middle of one.
_CHECK_END_SECONDS = 5.0
# A scrape's request head is a few hundred bytes (a basic-auth header included); these leave
# room for any real client and keep what a hostile one makes the process hold small.
MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_REQUEST_HEAD_BYTES = 16 * 1024
# Connections the kernel queues before accept(): a flood of connects must not make the
# kernel drop a scraper's SYN (its retry comes a second later).
LISTEN_BACKLOG = 128
# After an error answer or a refused handshake, how much of what the client still sends is read
# and dropped, so that it sees the answer rather than a reset (Go's servers read 256 KiB too).
_DRAIN_BYTES = 256 * 1024
_DRAIN_IDLE_SECONDS = 1.0
# What Go's HTTP servers answer to plain HTTP on a TLS port.
_PLAIN_HTTP_TO_TLS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
_TLS_HANDSHAKE_RECORD = 0x16
_SLOT_KEY = "ugro.endpoint.slot"  # the WSGI environ's key for the connection's _Slot

log = logging.getLogger("ugro.metrics_endpoint")

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


@dataclass
class EndpointCounts:
    """What clients did that was refused or failed; for logs and tests."""

    answered: int = 0
    # closed at accept (MAX_THREADS threads ran), or 503 (MAX_WAITING_PASSWORD_CHECKS waited)
    refused_busy: int = 0
    evicted: int = 0  # cut to make room for a newer connection (all slots were taken)
    cut_at_deadline: int = 0
    failed_handshakes: int = 0  # no TLS, a wrong or missing client certificate, a silent client
    idle_timeouts: int = 0  # plain HTTP: silent for IDLE_SECONDS before or during its request
    bad_requests: int = 0  # malformed or oversize request head; TLS to a plain endpoint
    unauthorized: int = 0  # no or wrong basic auth credentials
    failed: int = 0  # anything else a connection ended with
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


@dataclass(eq=False)
class _Slot:
    """One accepted connection while its thread runs."""

    watch: socket.socket  # a duplicate of the socket: cutting it wakes the thread's read/write
    deadline: float  # monotonic
    answering: bool = False  # its request head is read: a response is being made
    cut: str | None = None  # why it was cut (an EndpointCounts field), once it was


def _drain(connection: socket.socket) -> None:
    """End our side, then read and drop what the client still sends (a bounded amount):
    closing with bytes unread sends a reset, which can overtake the last answer."""
    with contextlib.suppress(OSError, ValueError):
        connection.shutdown(socket.SHUT_WR)  # a TLS socket: its raw socket from here
        connection.settimeout(_DRAIN_IDLE_SECONDS)
        left = _DRAIN_BYTES
        while left > 0 and (chunk := connection.recv(min(left, 65536))):
            left -= len(chunk)


class _DebugLog:
    """Where wsgiref writes a failed response's traceback: the debug log, not stderr."""

    def write(self, text: str) -> None:
        if text.strip():
            log.debug("%s", text.rstrip())

    def flush(self) -> None:
        pass


class _HeadReader:
    """The connection's input, of which the request head may take ``budget`` bytes; past it a
    read raises ``LineTooLong``, which ``parse_request`` answers with 431."""

    def __init__(self, raw: Any, budget: int) -> None:
        self.raw = raw
        self.budget = budget

    def readline(self, limit: int = -1) -> bytes:
        allowed = self.budget + 1 if limit < 0 else min(limit, self.budget + 1)
        line = self.raw.readline(allowed)
        self.budget -= len(line)
        if self.budget < 0:
            raise http.client.LineTooLong(f"request head over {MAX_REQUEST_HEAD_BYTES} bytes")
        return line

    def __getattr__(self, name: str) -> Any:  # read, close, ...: the body is not limited here
        return getattr(self.raw, name)


class _Handler(WSGIRequestHandler):
    timeout = IDLE_SECONDS  # StreamRequestHandler applies it to every read and write

    def __init__(self, request: Any, client_address: Any, server: _Server, slot: _Slot) -> None:
        self.slot = slot
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        """wsgiref's ``handle``, with the request head bounded and the slot marked answered."""
        self.rfile = _HeadReader(self.rfile, MAX_REQUEST_HEAD_BYTES)
        self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE_BYTES + 1)
        if len(self.raw_requestline) > MAX_REQUEST_LINE_BYTES:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():  # an error was sent, or the client sent nothing
            return
        self.slot.answering = True
        handler = ServerHandler(
            self.rfile.raw, self.wfile, self.get_stderr(), self.get_environ(), multithread=False
        )
        handler.request_handler = self
        handler.run(self.server.get_app())

    def get_environ(self) -> dict:
        environ = super().get_environ()
        environ[_SLOT_KEY] = self.slot
        return environ

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if self.slot.cut is not None:  # what it read was cut short, by the endpoint
            self.close_connection = True
            return
        self.server.counts.add("bad_requests")
        super().send_error(code, message, explain)
        _drain(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def get_stderr(self) -> Any:
        return _DebugLog()


class _Server(WSGIServer):
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        tls: ssl.SSLContext | None,
        counts: EndpointCounts,
    ) -> None:
        self.address_family = family
        self.tls = tls
        self.counts = counts
        self._lock = threading.Condition()
        self._slots: dict[_Slot, None] = {}  # connections not cut, oldest first
        self._threads = 0  # connection threads running, cut ones included
        self._closing = False
        self.password_checks: _PasswordChecks | None = None
        super().__init__(address, _Handler)  # binds: OSError when the address is taken
        self._reaper = threading.Thread(target=self._reap, name="ugro-endpoint-reaper", daemon=True)
        self._reaper.start()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host's name up (getfqdn), which takes seconds on a
        # host with a slow resolver; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Answer on a thread of its own: in a free slot, or in the slot of the oldest
        connection not yet answered; closed at once when MAX_THREADS threads run."""
        with self._lock:
            if self._threads >= MAX_THREADS or self._closing:
                self.counts.add("refused_busy")
                self.shutdown_request(request)
                return
            if len(self._slots) >= MAX_CONNECTIONS:
                # dict order is arrival order: min() picks the oldest not yet answered
                self._cut(min(self._slots, key=lambda slot: slot.answering), "evicted")
            try:
                slot = _Slot(request.dup(), time.monotonic() + REQUEST_DEADLINE_SECONDS)
            except OSError:  # out of file descriptors: this client waits for a retry
                self.counts.add("refused_busy")
                self.shutdown_request(request)
                return
            self._slots[slot] = None
            self._threads += 1
            self._lock.notify_all()  # the reaper's next deadline may be this one
        try:
            threading.Thread(
                target=self._answer,
                args=(request, client_address, slot),
                name="ugro-endpoint-connection",
                daemon=True,
            ).start()
        except BaseException:  # no thread to free the slot: free it here; the caller closes
            self._finished(slot)
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints a traceback to stderr here; the endpoint logs it at debug."""
        self.counts.add("failed")
        log.debug("taking the connection of %s failed", client_address, exc_info=True)

    def _cut(self, slot: _Slot, reason: str | None) -> None:
        """Wake ``slot``'s thread out of any read or write; call with the lock held."""
        self._slots.pop(slot, None)
        slot.cut = reason or "closing"
        if reason:
            self.counts.add(reason)
        with contextlib.suppress(OSError):
            slot.watch.shutdown(socket.SHUT_RDWR)

    def _answer(self, request: socket.socket, client_address: Any, slot: _Slot) -> None:
        connection = request
        try:
            request.settimeout(IDLE_SECONDS)
            first = request.recv(1, socket.MSG_PEEK)
            if not first:  # closed before a byte: a port probe
                return
            if self.tls is not None:
                if first.isalpha():  # "GET ...": plain HTTP, no handshake will come
                    self.counts.add("failed_handshakes")
                    # take what it sent, so that closing does not reset the answer away
                    request.recv(MAX_REQUEST_HEAD_BYTES)
                    request.sendall(_PLAIN_HTTP_TO_TLS)
                    return
                connection = self.tls.wrap_socket(
                    request, server_side=True, do_handshake_on_connect=False
                )
                try:
                    connection.do_handshake()
                except (OSError, ValueError) as error:
                    if slot.cut is None:
                        self.counts.add("failed_handshakes")
                    if slot.cut is None and not isinstance(error, TimeoutError):
                        # A TLS 1.3 client sends its request right after its certificate:
                        # unread, closing would reset the alert that says why away.
                        _drain(connection)
                    log.debug("TLS handshake with %s failed: %s", client_address, error)
                    return
            elif first[0] == _TLS_HANDSHAKE_RECORD:
                self.counts.add("bad_requests")
                log.debug("%s began a TLS handshake on a plain HTTP endpoint", client_address)
                return
            _Handler(connection, client_address, self, slot)
        except Exception as error:  # a client's doing: counted, never raised in the process
            if slot.cut is None:  # else counted when it was cut
                if not isinstance(error, TimeoutError) or slot.answering:
                    self.counts.add("failed")
                elif self.tls is not None and connection is request:  # silent before a hello
                    self.counts.add("failed_handshakes")
                else:
                    self.counts.add("idle_timeouts")
            log.debug("answering %s failed: %s", client_address, error)
        finally:
            self.shutdown_request(connection)
            self._finished(slot)

    def _finished(self, slot: _Slot) -> None:
        with self._lock:
            self._slots.pop(slot, None)
            self._threads -= 1
            self._lock.notify_all()
        slot.watch.close()

    def _reap(self) -> None:
        """Cut every connection at its deadline; sleeps until the next one is due."""
        with self._lock:
            while not self._closing:
                now = time.monotonic()
                for slot in [slot for slot in self._slots if slot.deadline <= now]:
                    self._cut(slot, "cut_at_deadline")
                # the oldest slot has the earliest deadline
                due = next(iter(self._slots), None)
                self._lock.wait(None if due is None else max(due.deadline - now, 0.01))

    def close(self, wait: float) -> None:
        """Stop taking connections; give open ones ``wait`` seconds, then cut them."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            self._lock.wait_for(lambda: not self._slots, wait)
            for slot in list(self._slots):
                self._cut(slot, None)
            if self.password_checks is not None:
                self.password_checks.close()
            # Their threads wake at once, but one may be in a bcrypt: Python 3.11 ends a daemon
            # thread that comes back from C code while the interpreter exits, and bcrypt's Rust
            # code aborts the process then (SIGABRT, seen here), so wait for it.
            self._lock.wait_for(lambda: not self._threads, _CHECK_END_SECONDS)
        self._reaper.join(timeout=1)
        self.server_close()

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads


@dataclass
class MetricsEndpoint:
    """A running endpoint; ``close()`` stops it and frees the port."""

    host: str
    port: int
    scheme: str
    counts: EndpointCounts
    _server: _Server
    _thread: threading.Thread

    def close(self) -> None:
        """Stop accepting, let the responses being written finish (briefly), free the port."""
        self._server.shutdown()
        self._server.close(CLOSE_WAIT_SECONDS)
        self._thread.join(timeout=2)

    @property
    def open_connections(self) -> int:
        """Connection threads running now (cut ones still unwinding included)."""
        return self._server.threads


def serve_registry(
    registry: CollectorRegistry, host: str, port: int, web_config: WebConfig | None = None
) -> MetricsEndpoint:
    """Serve ``registry`` on ``host:port`` (port 0: any free one) as ``web_config`` says (plain
    HTTP without one). OSError when the address cannot be bound."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    counts = EndpointCounts()
    server = _Server((sockaddr[0], port), family, web_config and web_config.ssl_context, counts)
    if web_config and web_config.basic_auth_users:
        server.password_checks = _PasswordChecks(BasicAuth(web_config.basic_auth_users))
    server.set_app(_app(registry, web_config, server.password_checks, counts))
    thread = threading.Thread(target=server.serve_forever, name="ugro-metrics-endpoint",
                              daemon=True)  # fmt: skip
    thread.start()
    scheme = web_config.scheme if web_config else "http"
    return MetricsEndpoint(host, server.server_port, scheme, counts, server, thread)


class _PasswordChecks:
    """Basic auth checks made so that wrong passwords cannot crowd a scraper out.

    :class:`BasicAuth` makes one bcrypt at a time and remembers credentials that passed. Here
    credentials not seen to pass before wait for their check behind a gate: at most
    ``MAX_WAITING_PASSWORD_CHECKS`` of them (more are turned away at once, so a flood of wrong
    passwords holds a handful of threads, not all of them), and only one inside ``BasicAuth``
    at a time, so credentials that passed before (a scraper's, every scrape) wait for at most
    one bcrypt. A check whose connection was cut, or that comes after ``close()``, is skipped.
    What is remembered here only picks the way in; ``BasicAuth`` decides every time.
    """

    _KNOWN_SIZE = 16

    def __init__(self, auth: BasicAuth) -> None:
        self._auth = auth
        self._gate = threading.Lock()
        self._waiting = threading.BoundedSemaphore(MAX_WAITING_PASSWORD_CHECKS)
        self._known: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._closed = False

    def allows(self, header: str | None, slot: _Slot | None) -> bool | None:
        """Whether ``header`` holds a user's credentials; None: too many checks wait."""
        key = hashlib.sha256((header or "").encode("utf-8", "surrogateescape")).digest()
        if key in self._known:
            return self._auth.allows(header)
        if not self._waiting.acquire(blocking=False):
            return None
        try:
            with self._gate:
                if self._closed or (slot is not None and slot.cut is not None):
                    return False
                allowed = self._auth.allows(header)
                if allowed:
                    self._known[key] = None
                    while len(self._known) > self._KNOWN_SIZE:
                        self._known.popitem(last=False)
                return allowed
        finally:
            self._waiting.release()

    def close(self) -> None:
        """Checks that have not begun are skipped from now on."""
        self._closed = True


def _app(
    registry: CollectorRegistry,
    web_config: WebConfig | None,
    password_checks: _PasswordChecks | None,
    counts: EndpointCounts,
) -> WsgiApp:
    metrics = make_wsgi_app(registry)
    extra = list(web_config.headers.items()) if web_config else []

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if password_checks is not None:
            allowed = password_checks.allows(
                environ.get("HTTP_AUTHORIZATION"), environ.get(_SLOT_KEY)
            )
            if allowed is None:
                counts.add("refused_busy")
                start_response(
                    "503 Service Unavailable",
                    [("Content-Type", "text/plain; charset=utf-8"), ("Retry-After", "1"),
                     *extra],
                )  # fmt: skip
                return [b"Too many password checks at once\n"]
            if not allowed:
                counts.add("unauthorized")
                start_response(
                    "401 Unauthorized",
                    [("Content-Type", "text/plain; charset=utf-8"),
                     ("WWW-Authenticate", 'Basic realm="ugro", charset="UTF-8"'), *extra],
                )  # fmt: skip
                return [b"Unauthorized\n"]
        counts.add("answered")

        def start_with_headers(status: str, headers: list, exc_info: Any = None) -> Any:
            return start_response(status, [*headers, *extra], exc_info)

        return metrics(environ, start_with_headers)

    return app
