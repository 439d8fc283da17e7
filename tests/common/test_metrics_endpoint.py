"""The /metrics endpoint of every rank and exporter against hostile clients, in process: each
case, then a good scrape that must still be answered, and what the endpoint counted."""

from __future__ import annotations

import socket
import ssl
import threading
import urllib.error

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from tests.support import wait_for
from tests.support.certs import TlsMaterial, bcrypt_hash
from tests.support.hostile import (
    SCRAPER,
    SLOW_CLIENTS,
    Target,
    basic_authorization,
    client_context,
    flood,
    good_scrape,
    oversize_requests,
    secured_target,
    slow_clients,
    write_secured_web_config,
    wrong_protocol,
)
from ugro.common.metrics_endpoint import (
    MAX_CONNECTIONS,
    MAX_THREADS,
    REQUEST_DEADLINE_SECONDS,
    MetricsEndpoint,
    serve_registry,
)
from ugro.common.web_config import load_web_config

PASSWORD = "correct horse"
# Whatever a client does, nothing may escape a connection thread.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture(autouse=True)
def nothing_on_stderr(capfd):
    """The endpoint lives in a training process: a client's doing is counted, never printed."""
    yield
    assert capfd.readouterr().err == ""


@pytest.fixture(params=["plain", "tls+auth"])
def served(request, tls, tmp_path) -> tuple[MetricsEndpoint, Target]:
    registry = CollectorRegistry()
    Counter("ugro_hostile_probe", "A sample the good scrape looks for.", registry=registry).inc()
    if request.param == "plain":
        endpoint = serve_registry(registry, "127.0.0.1", 0)
        target = Target("127.0.0.1", endpoint.port)
    else:
        config = write_secured_web_config(tls, tmp_path / "web.yml", PASSWORD)
        endpoint = serve_registry(registry, "127.0.0.1", 0, load_web_config(config))
        target = secured_target(tls, endpoint.port, PASSWORD)
    yield endpoint, target
    endpoint.close()


def connection_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ugro-endpoint-connection"]


def assert_scrapes(target: Target) -> None:
    assert "ugro_hostile_probe_total 1.0" in good_scrape(target)


def test_oversize_requests_get_their_error_and_the_endpoint_keeps_answering(served):
    endpoint, target = served
    seen = oversize_requests(target)
    print(seen, endpoint.counts)
    assert seen["request line of 70 KiB"] == "414"
    assert seen["200 headers"] == "431"
    # Past the bytes it drains, the endpoint closes on the rest: the client may see a reset.
    assert seen["a header of 1 MiB"] in ("431", "reset", "closed")
    # prometheus_client answers 405 to a POST; the body is never read.
    assert seen["POST with a body of 8 MiB"] in ("405", "401", "reset", "closed")
    assert endpoint.counts.bad_requests == 3
    assert_scrapes(target)


def test_a_connection_flood_leaves_scrapes_answered(served):
    endpoint, target = served
    flood(target)
    assert_scrapes(target)
    assert endpoint.counts.answered == 1
    wait_for(lambda: endpoint.open_connections == 0, 10, "the flood's connections to end")


def test_garbage_and_the_wrong_protocol_are_refused_at_once(served):
    endpoint, target = served
    seen = wrong_protocol(target)
    if target.tls is not None:
        assert "Client sent an HTTP request to an HTTPS server" in seen["plain HTTP"]
        assert seen["plain HTTP"].startswith("HTTP/1.0 400 Bad Request")
        wait_for(lambda: endpoint.counts.failed_handshakes == 2, 10, "two failed handshakes")
    else:
        assert seen["TLS"] != "handshake completed"
        wait_for(lambda: endpoint.counts.bad_requests == 2, 10, "two bad requests")
    assert_scrapes(target)
    assert endpoint.counts.failed == 0


def test_slow_clients_cannot_lock_out_a_scrape_and_are_cut_at_the_deadline(served):
    endpoint, target = served
    baseline = threading.active_count()
    with slow_clients(target) as held:
        # Every slot is taken by now; each scrape takes the oldest unanswered one's.
        for _ in range(3):
            assert_scrapes(target)
        assert endpoint.open_connections <= MAX_THREADS
        assert endpoint.counts.evicted >= SLOW_CLIENTS - MAX_CONNECTIONS
        # Held open and trickling, they are still cut: the endpoint's threads end.
        wait_for(
            lambda: not connection_threads() and endpoint.open_connections == 0,
            REQUEST_DEADLINE_SECONDS + 10,
            "every connection thread to end",
        )
        # each trickling client sees its connection cut (a send after the cut still goes out)
        wait_for(lambda: not held.trickling, 10, "every trickling client to see the cut")
    assert threading.active_count() == baseline
    counts = endpoint.counts
    print(counts)
    assert counts.cut_at_deadline + counts.idle_timeouts + counts.failed_handshakes > 0
    assert counts.answered >= 3
    assert counts.refused_busy == 0 and counts.failed == 0
    assert_scrapes(target)


def test_the_oldest_unanswered_connection_makes_room(served):
    endpoint, target = served
    silent = [target.tcp() for _ in range(MAX_CONNECTIONS)]
    try:
        wait_for(lambda: endpoint.open_connections == MAX_CONNECTIONS, 10, "every slot taken")
        assert_scrapes(target)
        assert endpoint.counts.evicted == 1
        silent[0].settimeout(10)
        assert silent[0].recv(1) == b""  # cut: the oldest
        silent[1].setblocking(False)
        with pytest.raises(BlockingIOError):  # still open: the next oldest
            silent[1].recv(1)
    finally:
        for sock in silent:
            sock.close()


def refused_reason(tls: TlsMaterial, port: int, pair) -> str:
    target = Target("127.0.0.1", port, client_context(tls, pair))
    with target.connect() as connection:
        try:
            connection.sendall(target.request_head() + b"\r\n")
            connection.recv(1024)
        except ssl.SSLError as error:
            return str(error.reason)
        except OSError as error:
            return type(error).__name__
    return "answered"


def test_client_certificates_that_the_ca_did_not_sign_or_that_expired_fail_the_handshake(
    tls, tmp_path
):
    registry = CollectorRegistry()
    Counter("ugro_hostile_probe", "A sample the good scrape looks for.", registry=registry).inc()
    config = write_secured_web_config(tls, tmp_path / "web.yml", PASSWORD)
    endpoint = serve_registry(registry, "127.0.0.1", 0, load_web_config(config))
    try:
        # What a TLS 1.3 client learns when it sends its request as soon as its side of the
        # handshake is done, as Prometheus does: the alert, every time, not a reset.
        expected = {
            "another CA's": (tls.wrong_client, "UNKNOWN_CA"),
            "expired": (tls.expired_client, "CERTIFICATE_EXPIRED"),
            "self-signed": (tls.self_signed_client, "UNKNOWN_CA"),
            "none": (None, "CERTIFICATE_REQUIRED"),
        }
        for case, (pair, alert) in expected.items():
            reasons = [refused_reason(tls, endpoint.port, pair) for _ in range(5)]
            assert all(alert in reason for reason in reasons), (case, reasons)
        wait_for(lambda: endpoint.counts.failed_handshakes == 20, 10, "20 failed handshakes")
        with pytest.raises(urllib.error.HTTPError) as refused:
            good_scrape(secured_target(tls, endpoint.port, "wrong"))
        assert refused.value.code == 401
        assert_scrapes(secured_target(tls, endpoint.port, PASSWORD))
        assert endpoint.counts.unauthorized == 1 and endpoint.counts.answered == 1
    finally:
        endpoint.close()


def test_close_cuts_the_connections_it_holds(served):
    endpoint, target = served
    baseline = threading.active_count()
    with slow_clients(target, count=10):
        wait_for(lambda: endpoint.open_connections > 0, 10, "held connections")
        endpoint.close()
        wait_for(lambda: endpoint.open_connections == 0, 10, "the held connections cut")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", endpoint.port), timeout=2).close()
    wait_for(lambda: threading.active_count() < baseline, 10, "the endpoint's threads to end")


def test_a_thread_that_cannot_start_costs_one_connection_and_nothing_else(served, monkeypatch):
    """What a process at its thread limit does to a connection (``can't start new thread``)."""
    endpoint, target = served
    start = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        if thread.name == "ugro-endpoint-connection":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises((OSError, urllib.error.URLError)):
        good_scrape(target)
    monkeypatch.undo()
    assert endpoint.counts.failed == 1 and endpoint.open_connections == 0
    assert_scrapes(target)


def test_wrong_passwords_neither_crowd_out_a_known_scraper_nor_outlive_close(tmp_path):
    """With a real bcrypt cost (10: a tenth of a second per check here), a flood of wrong
    passwords queues for the one check at a time; the scraper, known from its first scrape, is
    answered all the same, the flood's excess gets 503, and close() returns with no thread left
    inside a bcrypt (an interpreter exiting then can abort)."""
    config = tmp_path / "web.yml"
    users = {SCRAPER: bcrypt_hash(PASSWORD, cost=10)}
    config.write_text(yaml.safe_dump({"basic_auth_users": users}))
    registry = CollectorRegistry()
    Counter("ugro_hostile_probe", "A sample the good scrape looks for.", registry=registry).inc()
    endpoint = serve_registry(registry, "127.0.0.1", 0, load_web_config(config))
    good = Target("127.0.0.1", endpoint.port, None, basic_authorization(SCRAPER, PASSWORD))
    wrong = Target("127.0.0.1", endpoint.port, None, basic_authorization(SCRAPER, "guess"))
    stop = threading.Event()
    refusals: list[int] = []

    def guess() -> None:
        while not stop.is_set():
            try:
                good_scrape(wrong, timeout=30)
            except urllib.error.HTTPError as error:
                refusals.append(error.code)
            except OSError:  # after close
                stop.wait(0.05)

    try:
        assert_scrapes(good)  # known from now on
        guessers = [threading.Thread(target=guess, daemon=True) for _ in range(24)]
        for thread in guessers:
            thread.start()
        wait_for(lambda: endpoint.counts.refused_busy > 0, 30, "the flood to get 503s")
        for _ in range(3):
            assert_scrapes(good)
        assert endpoint.open_connections <= MAX_THREADS
        endpoint.close()
        assert endpoint.open_connections == 0
    finally:
        stop.set()
        endpoint.close()
    for thread in guessers:
        thread.join(30)
    assert set(refusals) == {401, 503}
    assert endpoint.counts.answered == 4
    assert endpoint.counts.unauthorized > 0 and endpoint.counts.failed == 0
