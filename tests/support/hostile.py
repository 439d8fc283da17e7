"""Hostile clients of a ``/metrics`` endpoint, every one bounded and on loopback only: oversize
requests, slow and silent connections, responses never read, connection floods, garbage and
the wrong protocol; and the good scrape that must still be answered while they hold on."""

from __future__ import annotations

import base64
import contextlib
import os
import pathlib
import socket
import ssl
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import yaml

from tests.support.certs import TlsMaterial

# More than the endpoint's MAX_CONNECTIONS, so a round fills every slot.
SLOW_CLIENTS = 40
SLOW_READERS = 8
SCRAPER = "prometheus"
WRONG_PASSWORDS = 10
FLOOD_CONNECTIONS = 150


@dataclass(frozen=True)
class Target:
    """An endpoint as a client sees it. ``tls``: a client context that completes the handshake
    (None: plain HTTP); ``authorization``: a good ``Authorization`` header, or None."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    authorization: str | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/metrics"

    def tcp(self, timeout: float = 5.0, receive_buffer: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connect, so the window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout)
        try:
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self, timeout: float = 5.0, receive_buffer: int | None = None) -> socket.socket:
        """A connection that speaks the endpoint's protocol (TLS handshake done)."""
        sock = self.tcp(timeout, receive_buffer)
        if self.tls is None:
            return sock
        try:
            return self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def request_head(self, target: str = "/metrics", method: str = "GET") -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if self.authorization:
            lines.append(f"Authorization: {self.authorization}")
        return ("\r\n".join(lines) + "\r\n").encode()


def write_secured_web_config(tls: TlsMaterial, path: pathlib.Path, password: str) -> pathlib.Path:
    """A web config asking for everything: TLS, a client certificate from ``tls.ca`` and the
    scraper's password."""
    path.write_text(yaml.safe_dump(tls.web_config(password, user=SCRAPER)))
    return path


def client_context(tls: TlsMaterial, pair=None) -> ssl.SSLContext:
    """A client trusting ``tls.ca``, presenting ``pair`` (a KeyPair) if given."""
    context = ssl.create_default_context(cafile=str(tls.ca.cert_file))
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    return context


def secured_target(tls: TlsMaterial, port: int, password: str, pair=None) -> Target:
    """The endpoint as a scraper sees it: a client certificate (``tls.client`` by default)."""
    context = client_context(tls, pair or tls.client)
    return Target("127.0.0.1", port, context, basic_authorization(SCRAPER, password))


def basic_authorization(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def good_scrape(target: Target, timeout: float = 10.0) -> str:
    """The exposition, as a scraper with the right certificate and password gets it; raises
    when the answer is anything but 200."""
    request = urllib.request.Request(target.url)
    if target.authorization:
        request.add_header("Authorization", target.authorization)
    with urllib.request.urlopen(request, timeout=timeout, context=target.tls) as response:
        assert response.status == 200, response.status
        return response.read().decode()


def exchange(target: Target, data: bytes, timeout: float = 10.0) -> str:
    """Send ``data`` (as far as the endpoint takes it) and return the answer's status code,
    or how the connection ended: ``reset`` or ``closed``."""
    with contextlib.ExitStack() as stack:
        try:
            sock = stack.enter_context(target.connect(timeout))
        except (OSError, ssl.SSLError):
            return "refused"
        with contextlib.suppress(OSError):
            sock.sendall(data)  # the endpoint may close before taking all of it
        try:
            answer = sock.recv(64)
        except ConnectionResetError:
            return "reset"
        except OSError:
            return "closed"
        if not answer:
            return "closed"
        parts = answer.split(b" ", 2)
        return parts[1].decode() if len(parts) > 1 else repr(answer)


def oversize_requests(target: Target) -> dict[str, str]:
    """Requests far past the endpoint's limits; what each got back."""
    head = target.request_head()
    many_headers = b"".join(b"X-Padding-%d: %d\r\n" % (i, i) for i in range(200))
    body = 8 * 1024 * 1024
    return {
        "request line of 70 KiB": exchange(
            target, target.request_head("/" + "a" * 70 * 1024) + b"\r\n"
        ),
        "200 headers": exchange(target, head + many_headers + b"\r\n"),
        "a header of 1 MiB": exchange(target, head + b"X-Big: " + b"b" * (1 << 20) + b"\r\n\r\n"),
        "POST with a body of 8 MiB": exchange(
            target,
            target.request_head(method="POST")
            + b"Content-Length: %d\r\n\r\n" % body
            + os.urandom(1024) * (body // 1024),
        ),
    }


def wrong_passwords(target: Target, count: int = WRONG_PASSWORDS) -> list[str]:
    """Requests with a wrong password (over the right TLS); the status each got."""
    wrong = Target(target.host, target.port, target.tls, basic_authorization(SCRAPER, "guess"))
    return [exchange(wrong, wrong.request_head() + b"\r\n") for _ in range(count)]


def flood(target: Target, count: int = FLOOD_CONNECTIONS) -> None:
    """Connections opened and dropped at once: half closed, half reset."""
    for i in range(count):
        with contextlib.suppress(OSError):
            sock = target.tcp()
            if i % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


def wrong_protocol(target: Target) -> dict[str, str]:
    """Garbage, and the other protocol than the endpoint speaks; what each client saw."""
    seen = {}
    with target.tcp() as sock:
        with contextlib.suppress(OSError):
            sock.sendall(bytes(range(256)) * 16)
            sock.recv(64)
        seen["garbage"] = "done"
    if target.tls is not None:
        with target.tcp() as sock:
            sock.sendall(target.request_head() + b"\r\n")
            seen["plain HTTP"] = sock.recv(4096).decode(errors="replace")
    else:
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        with target.tcp() as sock:
            try:
                client.wrap_socket(sock).close()
                seen["TLS"] = "handshake completed"
            except (OSError, ssl.SSLError) as error:
                seen["TLS"] = type(error).__name__
    return seen


@dataclass
class HeldClients:
    """Connections a hostile round keeps open, and the thread that trickles bytes into some."""

    sockets: list[socket.socket] = field(default_factory=list)
    opened: int = 0  # connections made, those already cut included
    trickling: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start_trickling(self, interval: float = 0.5) -> None:
        """A byte into every trickling connection each ``interval``: never idle, never done."""

        def trickle() -> None:
            while not self._stop.wait(interval):
                for sock in list(self.trickling):
                    try:
                        sock.send(b"X")
                    except OSError:  # cut by the endpoint: as it should be
                        self.trickling.remove(sock)

        self._thread = threading.Thread(target=trickle, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()


@contextlib.contextmanager
def slow_clients(
    target: Target, count: int = SLOW_CLIENTS, readers: int = SLOW_READERS
) -> Iterator[HeldClients]:
    """Connections held open while the block runs: ``count`` that never finish a request (half
    trickle a request head byte by byte, half are silent: for TLS, connected and no ClientHello),
    then ``readers`` that sent a whole request and never read the answer (a tiny receive
    window; an answer that fits the kernel's buffers still completes)."""
    held = HeldClients()
    try:
        for i in range(count + readers):
            with contextlib.suppress(OSError, ssl.SSLError):
                if i >= count:
                    sock = target.connect(receive_buffer=1024)
                    sock.sendall(target.request_head() + b"\r\n")
                elif i % 2:
                    sock = target.tcp()
                else:
                    sock = target.connect()
                    sock.send(target.request_head()[:20])
                    held.trickling.append(sock)
                held.sockets.append(sock)
        held.opened = len(held.sockets)
        held.start_trickling()
        yield held
    finally:
        held.close()
