"""Talking to local servers: a JSON request (and a free loopback port, from ugro.common)."""

from __future__ import annotations

import json
import urllib.request

# Kept importable from here for the tests that still do.
from ugro.common.ports import free_port as free_port


def http_json(url: str, data: object | None = None, timeout: float = 5.0) -> object:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")
