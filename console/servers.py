"""Small clients for Prometheus's and Alertmanager's HTTP APIs.

Both raise ``Unreachable`` when the server does not answer and ``QueryError`` when it answers
with an error, each with a message that names the server, so a caller can show it and retry.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_PROMETHEUS_URL = "http://localhost:9090"
DEFAULT_ALERTMANAGER_URL = "http://localhost:9093"


def default_prometheus_url() -> str:
    return os.environ.get("UGRO_PROMETHEUS_URL", DEFAULT_PROMETHEUS_URL)


def default_alertmanager_url() -> str:
    return os.environ.get("UGRO_ALERTMANAGER_URL", DEFAULT_ALERTMANAGER_URL)


class Unreachable(ConnectionError):
    """The server did not answer (refused, timed out, name not found)."""


class QueryError(RuntimeError):
    """The server answered with an error (a bad query, a bad request)."""


def _get_json(url: str, what: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        try:
            detail = json.loads(body).get("error", body)
        except ValueError:
            detail = body
        raise QueryError(f"{what} answered {error.code}: {detail.strip()[:300]}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise Unreachable(f"{what} does not answer: {reason}") from None
    except ValueError as error:
        raise QueryError(f"{what} answered something that is not JSON: {error}") from None


class Prometheus:
    """``query`` (instant) and ``query_range`` over Prometheus's HTTP API."""

    def __init__(self, url: str | None = None, timeout: float = 10.0) -> None:
        self.url = (url or default_prometheus_url()).rstrip("/")
        self.timeout = timeout

    def _api(self, path: str, params: dict[str, Any]) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        reply = _get_json(url, f"Prometheus at {self.url}", self.timeout)
        if reply.get("status") != "success":
            raise QueryError(f"Prometheus at {self.url}: {reply.get('error', reply)}")
        return reply["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """The instant vector ``expr`` at ``at`` (Unix seconds; default now)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """The range matrix of ``expr``: ``[{"metric": {...}, "values": [[t, "v"], ...]}]``."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step}
        return self._api("query_range", params)["result"]


class Alertmanager:
    """Alerts Alertmanager holds, through its v2 API."""

    def __init__(self, url: str | None = None, timeout: float = 10.0) -> None:
        self.url = (url or default_alertmanager_url()).rstrip("/")
        self.timeout = timeout

    def alerts(self, **matchers: str) -> list[dict]:
        """Active, unsilenced, uninhibited alerts whose labels equal ``matchers``."""
        params = [("active", "true"), ("silenced", "false"), ("inhibited", "false")]
        params += [("filter", f'{name}="{value}"') for name, value in sorted(matchers.items())]
        url = f"{self.url}/api/v2/alerts?{urllib.parse.urlencode(params)}"
        return _get_json(url, f"Alertmanager at {self.url}", self.timeout)
