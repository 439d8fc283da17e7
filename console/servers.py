"""Small clients for Prometheus's and Alertmanager's HTTP APIs.

Both raise ``Unreachable`` when the server does not answer (in time) and ``QueryError`` when it
answers with an error or with something that is not its API, each with a message that names the
server, so a caller can show it and retry. Every answer is checked against the shape the API
documents before a caller sees it: a caller may index into what it gets without guarding.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ugro.common.messages import shown
from ugro.common.ports import DEFAULT_ALERTMANAGER_PORT, DEFAULT_PROMETHEUS_PORT

DEFAULT_PROMETHEUS_URL = f"http://localhost:{DEFAULT_PROMETHEUS_PORT}"
DEFAULT_ALERTMANAGER_URL = f"http://localhost:{DEFAULT_ALERTMANAGER_PORT}"
# Far above a real answer (a report's range query of a large job is a few MB); below what
# would hurt this machine to hold and parse.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_CHUNK_BYTES = 64 * 1024
_ERROR_BODY_BYTES = 64 * 1024  # of an error answer; only its start is shown


def default_prometheus_url() -> str:
    return os.environ.get("UGRO_PROMETHEUS_URL", DEFAULT_PROMETHEUS_URL)


def default_alertmanager_url() -> str:
    return os.environ.get("UGRO_ALERTMANAGER_URL", DEFAULT_ALERTMANAGER_URL)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a server to query, or None when it can."""
    expected = f"expected an http:// or https:// URL with a host, e.g. {DEFAULT_PROMETHEUS_URL}"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number 0..65535
    except ValueError as error:
        return f"{expected} ({error})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return expected
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return f"{expected} (it contains a space or a control character)"
    if parts.query or parts.fragment:
        return f"{expected}, without ?query or #fragment (API paths are added to it)"
    return None


class Unreachable(ConnectionError):
    """The server did not answer (refused, timed out, name not found)."""


class QueryError(RuntimeError):
    """The server answered with an error (a bad query, a bad request) or not as its API does."""


# -- one request, with a total deadline --------------------------------------------------------


class _Cutoff:
    """Cuts a request's connections once its total time is up.

    A socket timeout bounds each read, not the request: a server that sends a byte every few
    seconds would hold a request for ever. At the deadline a timer shuts down the request's
    sockets, which ends whatever read is blocked on them, in the headers or in the body."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def opener(self) -> urllib.request.OpenerDirector:
        return urllib.request.build_opener(_HTTPHandler(self), _HTTPSHandler(self))


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing left to cut
        sock.shutdown(socket.SHUT_RDWR)


class _CutoffMixin:
    """Registers each connection's socket with the request's cutoff as soon as it connects."""

    def __init__(self, cutoff: _Cutoff) -> None:
        super().__init__()
        self.cutoff = cutoff

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        cutoff = self.cutoff

        class Connection(http_class):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                cutoff.watch(self.sock)

        return super().do_open(Connection, req, **kwargs)  # type: ignore[misc]


class _HTTPHandler(_CutoffMixin, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_CutoffMixin, urllib.request.HTTPSHandler):
    pass


def _read_capped(response: Any, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` bytes (read no further than that)."""
    length = response.headers.get("Content-Length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        return None
    chunks, total = [], 0
    while chunk := response.read(_CHUNK_BYTES):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _get_json(url: str, what: str, timeout: float) -> Any:
    """The JSON answer to GET ``url``; ``timeout`` (seconds) bounds the whole request."""
    cutoff = _Cutoff(timeout)
    late = Unreachable(f"{what} did not send its whole answer within {timeout:g} s")
    try:
        with cutoff.opener().open(url, timeout=timeout) as response:
            body = _read_capped(response, MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as error:
        raw = _read_capped(error, _ERROR_BODY_BYTES) if error.fp is not None else b""
        if cutoff.expired:
            raise late from None
        text = (raw or b"").decode(errors="replace")
        try:
            detail = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            detail = text
        raise QueryError(f"{what} answered {error.code}: {str(detail).strip()[:300]}") from None
    except (urllib.error.URLError, OSError) as error:
        if cutoff.expired:
            raise late from None
        reason = getattr(error, "reason", error)
        raise Unreachable(f"{what} does not answer: {reason}") from None
    except http.client.HTTPException as error:
        if cutoff.expired:
            raise late from None
        # Something answered on that port, but not in HTTP (or it broke off mid-answer).
        raise QueryError(f"{what} answered something that is not HTTP: {shown(error)}") from None
    finally:
        cutoff.cancel()
    if cutoff.expired:  # an answer without a length ends where the cut made it end
        raise late
    if body is None:
        raise QueryError(f"{what} answered more than {MAX_RESPONSE_BYTES // 1024**2} MiB")
    try:
        return json.loads(body.decode())
    except ValueError as error:
        raise QueryError(f"{what} answered something that is not JSON: {error}") from None


# -- the shape of an answer ----------------------------------------------------------------------


class _Shape:
    """Checks one answer against the API's documented shape; ``wrong`` names where it is not."""

    def __init__(self, what: str, endpoint: str) -> None:
        self.what = what
        self.endpoint = endpoint

    def wrong(self, where: str, value: Any, expected: str) -> QueryError:
        return QueryError(
            f"{self.what} answered {self.endpoint} not as its API does: {where} is "
            f"{shown(value)}, expected {expected}"
        )

    def labels(self, value: Any, where: str) -> dict[str, str]:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.wrong(where, value, "an object of label names and string values")
        return value

    def point(self, value: Any, where: str) -> None:
        """``[unix_seconds, "number"]``, the number as Prometheus writes it ("NaN", "+Inf")."""
        if (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], int | float)
            and not isinstance(value[0], bool)
            and math.isfinite(value[0])
            and isinstance(value[1], str)
        ):
            try:
                float(value[1])
                return
            except ValueError:
                pass
        raise self.wrong(where, value, '[unix time, "number"]')

    def sample(self, value: Any, where: str, key: str) -> None:
        if not isinstance(value, dict):
            raise self.wrong(where, value, f'an object with "metric" and "{key}"')
        self.labels(value.get("metric"), f"{where}.metric")
        if key == "value":
            self.point(value.get("value"), f"{where}.value")
            return
        points = value.get("values")
        if not isinstance(points, list):
            raise self.wrong(f"{where}.values", points, "a list of points")
        for i, point in enumerate(points):
            self.point(point, f"{where}.values[{i}]")


class Prometheus:
    """``query`` (instant) and ``query_range`` over Prometheus's HTTP API."""

    def __init__(self, url: str | None = None, timeout: float = 10.0) -> None:
        self.url = (url or default_prometheus_url()).rstrip("/")
        self.timeout = timeout  # seconds for one whole request

    def _api(self, path: str, params: dict[str, Any], expected: tuple[str, ...]) -> Any:
        """``data`` of the answer, checked: its ``resultType`` is one of ``expected`` and its
        ``result`` has that type's shape."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        what = f"Prometheus at {self.url}"
        reply = _get_json(url, what, self.timeout)
        shape = _Shape(what, f"/api/v1/{path}")
        if not isinstance(reply, dict):
            raise shape.wrong("the answer", reply, 'an object with "status" and "data"')
        if reply.get("status") == "error":
            detail = reply.get("error")
            raise QueryError(f"{what}: {detail if isinstance(detail, str) else shown(detail)}")
        if reply.get("status") != "success":
            raise shape.wrong("status", reply.get("status"), '"success" or "error"')
        data = reply.get("data")
        if not isinstance(data, dict):
            raise shape.wrong("data", data, 'an object with "resultType" and "result"')
        kind, result = data.get("resultType"), data.get("result")
        if kind not in expected:
            wanted = " or ".join(f'"{k}"' for k in expected)
            raise shape.wrong("data.resultType", kind, f"{wanted} for {shown(params['query'])}")
        if kind == "scalar":
            shape.point(result, "data.result")
            return data
        if not isinstance(result, list):
            raise shape.wrong("data.result", result, f"a list (of a {kind})")
        key = "value" if kind == "vector" else "values"
        for i, sample in enumerate(result):
            shape.sample(sample, f"data.result[{i}]", key)
        return data

    def query(self, expr: str, at: float | None = None, *, matrix: bool = False) -> list[dict]:
        """The instant vector ``expr`` at ``at`` (Unix seconds; default now): samples
        ``{"metric": {...}, "value": [t, "v"]}``; a scalar is one sample without labels. With
        ``matrix``, ``expr`` is a range selector and the samples carry ``"values"`` instead."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", params, ("matrix",) if matrix else ("vector", "scalar"))
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """The range matrix of ``expr``: ``[{"metric": {...}, "values": [[t, "v"], ...]}]``."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step}
        return self._api("query_range", params, ("matrix",))["result"]


class Alertmanager:
    """Alerts Alertmanager holds, through its v2 API."""

    def __init__(self, url: str | None = None, timeout: float = 10.0) -> None:
        self.url = (url or default_alertmanager_url()).rstrip("/")
        self.timeout = timeout  # seconds for one whole request

    def alerts(self, **matchers: str) -> list[dict]:
        """Active, unsilenced, uninhibited alerts whose labels equal ``matchers``: each with
        ``labels`` (and, where Alertmanager has them, ``annotations`` and ``startsAt``)."""
        params = [("active", "true"), ("silenced", "false"), ("inhibited", "false")]
        params += [("filter", f'{name}="{value}"') for name, value in sorted(matchers.items())]
        url = f"{self.url}/api/v2/alerts?{urllib.parse.urlencode(params)}"
        what = f"Alertmanager at {self.url}"
        alerts = _get_json(url, what, self.timeout)
        shape = _Shape(what, "/api/v2/alerts")
        if not isinstance(alerts, list):
            raise shape.wrong("the answer", alerts, "a list of alerts")
        for i, alert in enumerate(alerts):
            if not isinstance(alert, dict):
                raise shape.wrong(f"alert [{i}]", alert, 'an object with "labels"')
            shape.labels(alert.get("labels"), f"alert [{i}].labels")
            if "annotations" in alert:
                shape.labels(alert["annotations"], f"alert [{i}].annotations")
            if not isinstance(alert.get("startsAt", ""), str):
                raise shape.wrong(f"alert [{i}].startsAt", alert["startsAt"], "a time as text")
        return alerts
