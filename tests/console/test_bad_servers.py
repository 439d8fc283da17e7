"""``ugro report``, ``compare`` and ``watch`` against servers that answer badly: JSON of the
wrong shape, a trickle of bytes, an endless answer, and URLs that cannot name a server.

The servers are real HTTP servers on loopback (``http.server`` in a thread), each answering
every request the same scripted way.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ugro.console import cli, report
from ugro.console.gather import gather
from ugro.console.servers import Alertmanager, Prometheus, QueryError, Unreachable

JOB = "bad-servers"
TRICKLE_SECONDS = 0.5  # between the bytes of a trickling server
TRICKLE_FOR = 30.0  # a trickling server gives up after this long (so no test hangs for ever)
DEADLINE = 1.5  # the whole-request deadline the tests set, in seconds
EMPTY_VECTOR = {"status": "success", "data": {"resultType": "vector", "result": []}}

Answer = Callable[[BaseHTTPRequestHandler], None]


def json_answer(document: object) -> Answer:
    body = json.dumps(document).encode()

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


def trickle_body(handler: BaseHTTPRequestHandler) -> None:
    """Headers at once, then a byte of a JSON document now and then, without an end."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.end_headers()
    handler.wfile.flush()
    _trickle(handler, b" ")


def trickle_headers(handler: BaseHTTPRequestHandler) -> None:
    """The status line, then one header that never ends."""
    handler.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
    handler.wfile.flush()
    _trickle(handler, b"a")


def _trickle(handler: BaseHTTPRequestHandler, byte: bytes) -> None:
    until = time.monotonic() + TRICKLE_FOR
    while time.monotonic() < until:
        handler.wfile.write(byte)
        handler.wfile.flush()
        time.sleep(TRICKLE_SECONDS)


def endless(handler: BaseHTTPRequestHandler) -> None:
    """An answer without a length that never ends, as fast as the client reads it."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.end_headers()
    block = b" " * 65536
    while True:
        handler.wfile.write(block)


@contextlib.contextmanager
def serving(answer: Answer) -> Iterator[str]:
    """A server on loopback answering every GET with ``answer``; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            # The client hangs up on a server it gives up on: that is the point, not an error.
            with contextlib.suppress(ConnectionError):
                answer(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def no_job_records(tmp_path, monkeypatch):
    """No ugro-launch record of the job on this machine: the servers alone answer."""
    monkeypatch.setenv("UGRO_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("UGRO_PROMETHEUS_URL", raising=False)
    monkeypatch.delenv("UGRO_ALERTMANAGER_URL", raising=False)


def ugro(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- JSON of the wrong shape ---------------------------------------------------------------------

WRONG_SHAPES = [
    pytest.param([], "the answer is [], expected an object", id="a-list"),
    pytest.param(
        {"status": "success", "data": {"result": "x"}},
        'data.resultType is None, expected "vector" or "scalar" for \'time()\'',
        id="no-result-type",
    ),
    pytest.param(
        {"status": "success", "data": {"resultType": "vector", "result": [1, 2]}},
        'data.result[0] is 1, expected an object with "metric" and "value"',
        id="numbers-for-samples",
    ),
    pytest.param(
        {"status": "success", "data": {"resultType": "vector", "result": "x"}},
        "data.result is 'x', expected a list (of a vector)",
        id="text-for-result",
    ),
    pytest.param(
        {
            "status": "success",
            "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "one"]}]},
        },
        "data.result[0].value is [1, 'one'], expected [unix time, \"number\"]",
        id="value-not-a-number",
    ),
    pytest.param(
        {"status": "success", "data": {"resultType": "vector", "result": [{"metric": 5}]}},
        "data.result[0].metric is 5, expected an object of label names",
        id="labels-not-an-object",
    ),
    pytest.param({"status": "pending"}, "status is 'pending', expected", id="odd-status"),
    pytest.param(EMPTY_VECTOR, "answered time() without a time", id="no-time"),
]


@pytest.mark.parametrize(("document", "expected"), WRONG_SHAPES)
def test_report_against_json_of_the_wrong_shape_is_one_line_and_exit_3(capsys, document, expected):
    with serving(json_answer(document)) as url:
        code, out, err = ugro(capsys, "--prometheus", url, "report", JOB)
    assert code == report.EXIT_UNAVAILABLE
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(f"ugro report: Prometheus at {url} answered "), line
    assert expected in line


def test_compare_against_json_of_the_wrong_shape_is_one_line_and_exit_3(capsys):
    with serving(json_answer({"status": "success", "data": {"result": "x"}})) as url:
        code, out, err = ugro(capsys, "--prometheus", url, "compare", JOB, "other", "--json")
    assert code == report.EXIT_UNAVAILABLE
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(f"ugro compare: Prometheus at {url} answered /api/v1/query not as")


def test_a_matrix_where_a_vector_is_due_is_refused_and_a_range_selector_gets_its_matrix():
    matrix = {"status": "success", "data": {"resultType": "matrix", "result": []}}
    with serving(json_answer(matrix)) as url:
        prometheus = Prometheus(url, timeout=5)
        assert prometheus.query("up[1m]", matrix=True) == []
        with pytest.raises(QueryError, match=r"data\.resultType is 'matrix', expected \"vector\""):
            prometheus.query("up")


def test_watch_once_shows_both_servers_as_unusable_and_exits_1(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per message, however long
    with (
        serving(json_answer([])) as prometheus,
        serving(json_answer({"alerts": []})) as alertmanager,
    ):
        code, out, err = ugro(
            capsys, "--prometheus", prometheus, "--alertmanager", alertmanager, "watch", JOB,
            "--once",
        )  # fmt: skip
    assert code == 1
    assert "Traceback" not in out + err
    assert (
        f"Prometheus at {prometheus} answered /api/v1/query not as its API does: the answer "
        "is [], expected an object" in out
    )
    assert (
        f"Alertmanager at {alertmanager} answered /api/v2/alerts not as its API does: the "
        "answer is {'alerts': []}, expected a list of alerts" in out
    )


@pytest.mark.parametrize(
    ("alerts", "expected"),
    [
        ([{"labels": "x"}], "alert [0].labels is 'x', expected an object of label names"),
        ([{"labels": {}, "annotations": []}], "alert [0].annotations is [], expected an object"),
        (["x"], "alert [0] is 'x', expected an object with \"labels\""),
        ([{"labels": {}, "startsAt": 5}], "alert [0].startsAt is 5, expected a time as text"),
    ],
)
def test_gather_keeps_going_when_alertmanager_answers_the_wrong_shape(alerts, expected):
    with (
        serving(json_answer(EMPTY_VECTOR)) as prometheus_url,
        serving(json_answer(alerts)) as alertmanager_url,
    ):
        snapshot = gather(
            JOB,
            Prometheus(prometheus_url, timeout=5),
            Alertmanager(alertmanager_url, timeout=5),
        )
    assert snapshot.prometheus_error is None
    assert snapshot.status == "waiting"  # Prometheus has no series of the job
    assert snapshot.alertmanager_error.startswith(
        f"Alertmanager at {alertmanager_url} answered /api/v2/alerts not as its API does: "
    )
    assert expected in snapshot.alertmanager_error
    assert not snapshot.complete


# -- slow and endless answers --------------------------------------------------------------------


def test_report_against_a_trickling_server_gives_up_at_the_deadline(capsys, monkeypatch):
    monkeypatch.setattr(report, "QUERY_TIMEOUT_SECONDS", DEADLINE)
    with serving(trickle_body) as url:
        started = time.monotonic()
        code, out, err = ugro(capsys, "--prometheus", url, "report", JOB)
        took = time.monotonic() - started
    assert code == report.EXIT_UNAVAILABLE
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(
        f"ugro report: Prometheus at {url} did not send its whole answer within {DEADLINE:g} s"
    ), line
    assert DEADLINE <= took < DEADLINE + 3


@pytest.mark.parametrize("answer", [trickle_body, trickle_headers], ids=["body", "headers"])
def test_a_trickle_anywhere_in_the_answer_is_cut_at_the_deadline(answer):
    with serving(answer) as url:
        prometheus, alertmanager = Prometheus(url, DEADLINE), Alertmanager(url, DEADLINE)
        for ask in (lambda: prometheus.query("up"), alertmanager.alerts):
            started = time.monotonic()
            with pytest.raises(Unreachable, match=f"within {DEADLINE:g} s"):
                ask()
            assert DEADLINE <= time.monotonic() - started < DEADLINE + 3


def test_watch_shows_a_trickling_prometheus_and_goes_on():
    with serving(trickle_body) as url, serving(json_answer([])) as alertmanager_url:
        started = time.monotonic()
        snapshot = gather(
            JOB,
            Prometheus(url, timeout=DEADLINE),
            Alertmanager(alertmanager_url, timeout=DEADLINE),
        )
    assert time.monotonic() - started < DEADLINE + 3
    assert snapshot.prometheus_error == (
        f"Prometheus at {url} did not send its whole answer within {DEADLINE:g} s"
    )
    assert snapshot.alertmanager_error is None


def test_an_endless_answer_is_refused_past_the_size_cap():
    with serving(endless) as url, pytest.raises(QueryError, match="answered more than 64 MiB"):
        Prometheus(url, timeout=30).query("up")


def test_a_server_that_does_not_speak_http_is_one_message():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def babble() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        thread = threading.Thread(target=babble, daemon=True)
        thread.start()
        with pytest.raises(QueryError, match="answered something that is not HTTP"):
            Prometheus(url, timeout=5).query("up")
        thread.join(timeout=5)


# -- URLs that cannot name a server ----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--prometheus", "not a url", "report", JOB],
            "ugro report: --prometheus 'not a url': expected an http:// or https:// URL with a "
            "host, e.g. http://localhost:9090",
        ),
        (
            ["--prometheus", "localhost:9090", "compare", JOB, "other"],
            "ugro compare: --prometheus 'localhost:9090': expected an http:// or https:// URL",
        ),
        (
            ["--alertmanager", "http://", "watch", JOB, "--once"],
            "ugro watch: --alertmanager 'http://': expected an http:// or https:// URL",
        ),
        (
            ["--prometheus", "http://localhost:99999", "report", JOB],
            "ugro report: --prometheus 'http://localhost:99999': expected an http:// or https://",
        ),
        (
            ["--prometheus=http://localhost:9090/?x=1", "report", JOB],
            "without ?query or #fragment",
        ),
    ],
)
def test_a_url_that_names_no_server_is_one_line_naming_the_flag_and_exit_2(capsys, argv, expected):
    code, out, err = ugro(capsys, *argv)
    assert code == 2
    assert out == ""
    [line] = err.splitlines()
    assert expected in line


def test_a_bad_url_from_the_environment_names_the_variable(capsys, monkeypatch):
    monkeypatch.setenv("UGRO_PROMETHEUS_URL", "prometheus.example")
    code, out, err = ugro(capsys, "report", JOB)
    assert (code, out) == (2, "")
    assert err == (
        "ugro report: $UGRO_PROMETHEUS_URL 'prometheus.example': expected an http:// or "
        "https:// URL with a host, e.g. http://localhost:9090\n"
    )


@pytest.mark.parametrize("verb", ["report", "watch", "compare"])
def test_a_job_id_ending_in_a_newline_is_refused(capsys, verb):
    # A pattern's $ also matches before a final newline; job ids are matched whole.
    extra = ["other-job"] if verb == "compare" else []
    code, out, err = ugro(capsys, "--prometheus=http://127.0.0.1:9", verb, "job\n", *extra)
    assert (code, out) == (2, "")
    assert "'job\\n'" in err
