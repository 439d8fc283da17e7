"""The rank's /metrics endpoint at its end: a scrape being answered when the rank closes its
telemetry and exits is still answered whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.request

# A rank whose collector takes a while (a big exposition on a loaded machine): as soon as a
# scrape has taken its values, the rank closes the endpoint and its process exits, as
# Telemetry.close() does once the final scrape has come.
RANK = textwrap.dedent(
    """
    import threading, time
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily
    from ugro.trainer.server import serve_metrics

    taken = threading.Event()

    class SlowCollector:
        def describe(self):
            return []

        def collect(self):
            taken.set()
            time.sleep(0.5)
            yield GaugeMetricFamily("final_value", "The rank's last word.", value=42)

    registry = CollectorRegistry()
    registry.register(SlowCollector())
    server = serve_metrics(registry, "127.0.0.1", 0, 0)
    print(server.port, flush=True)
    taken.wait()
    server.close()
    """
)


def test_the_scrape_being_answered_when_the_rank_exits_is_answered_whole():
    rank = subprocess.Popen([sys.executable, "-c", RANK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(rank.stdout.readline())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            body = response.read().decode()
        assert "final_value 42.0" in body
        assert rank.wait(timeout=30) == 0
    finally:
        rank.kill()
        rank.wait()
