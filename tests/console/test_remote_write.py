"""Prometheus forwards everything to a distributed store, and the store answers as it does.

The store is Debian's ``victoria-metrics``, receiving the project's Prometheus (test overlay,
1 s intervals) through ``remote_write`` as prometheus/remote-write.example.yml documents. One
real run feeds both: the reference trainer on 2 CPU ranks under torchrun, each rank naming a
GPU of ugro-exporter's scripted two-GPU NVML double, one NaN loss (so an alert fires and
``ALERTS`` has something to forward) and checkpoints (so the goodput figures have some).

After the run, a fixed instant ``T`` is chosen and the test waits until the store holds every
raw sample Prometheus holds up to ``T``. Then, at ``T``:

* the store holds the same raw samples as Prometheus (to its ~12 significant digits; it
  returns staleness markers as NaN points and keeps no NaN samples, docs/remote-write.md);
* every dashboard panel's query (both dashboards; instant at ``T``, range over the run with a
  1 s step) returns the same series and values from both;
* ``ugro report`` (text and ``--json``) and ``ugro watch --once`` print the same thing against
  either, both pointed at the same Alertmanager.

The commands ask for "now" where they have no time of their own; each server then sits behind
a small proxy that answers "now" with ``T`` (it adds ``time=T`` to an instant query without
one), and ``ugro watch`` reads its clock as ``T``, so both answers describe the same instant.

The store tags every forwarded sample with Prometheus's ``external_labels`` (``cluster``);
Prometheus's own queries do not show them, so that label is left out of the comparison. Where
the store's answers differ, each test lists every difference in one assertion.

Apart from the run: prometheus.yml with the remote-write example merged passes ``promtool check
config``, and the agent-mode example passes ``promtool check config --agent`` and, run by
Debian's Prometheus with ``--enable-feature=agent``, forwards its scrapes to the store.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import re
import shutil
import subprocess
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from tests.grafana.dashboards import DASHBOARD_FILES, load, targets
from tests.support import wait_for
from tests.support.fake_gpu import FAKE_GPU_UUIDS, fake_gpu_exporter
from tests.support.net import free_port, http_json
from tests.support.servers import ROOT, LocalBinary, ServerProcess
from tests.support.stack import AlertStack
from tests.support.training import TrainingJob
from ugro.common.processes import NotReady, ProcessExited, wait_until_ready
from ugro.console import cli, gather

JOB_ID = "rw-run"
NODE = "node-a"
STEPS = 200
TRAINER_ARGS = [
    "--batch-size", "8", "--context", "32", "--width", "64", "--depth", "1", "--seed", "0",
    f"--steps={STEPS}",
    # Steps of a few tens of milliseconds whatever the machine's load: the run spans a dozen
    # scrapes, so every rate and mean window has points.
    "--data-delay=0.05",
    "--checkpoint-every=50",
    "--fault-rank=1",
    "--nonfinite-loss-from=20",
    "--nonfinite-loss-steps=1",
    # Serving the final values for a few scrapes after the last step.
    "--linger=3",
]  # fmt: skip
# Added to remote-written samples by Prometheus (prometheus.yml's external_labels); its own
# queries do not show them.
EXTERNAL_LABELS = {"cluster"}
SUBSTITUTIONS = {
    "$__rate_interval": "10s",  # what Grafana picks for a 1 s scrape interval
    "$__interval": "1s",
    "$job_id": JOB_ID,
    "$node": NODE,
    "$rank": "(0|1)",
}
# The store keeps a value to about 12 significant digits (measured: relative differences up
# to 1e-12 from Prometheus's float64), so a figure computed from the same samples agrees to
# ~1e-12 relative; where it subtracts two Unix times of ~1.8e9 s ("time since the last step")
# the difference keeps the times' absolute error, measured up to 2e-6 s. Anything beyond
# both is a real difference: rate() differences are percents.
RELATIVE_TOLERANCE = 1e-9
ABSOLUTE_TOLERANCE = 1e-5
# Differences found, understood and documented in docs/remote-write.md, by where they show:
# "DASHBOARD:PANEL TITLE:REFID" or "report:JSON PATH" (and its text line) -> why. Left out of
# the comparison, and listed in the test's output.
KNOWN_DIFFERENCES: dict[str, str] = {}


# -- the store ---------------------------------------------------------------------------------


@contextlib.contextmanager
def victoria_metrics(workdir) -> Iterator[str]:
    """A single-node VictoriaMetrics on loopback; yields its URL."""
    binary = shutil.which("victoria-metrics")
    if binary is None:
        pytest.skip("victoria-metrics is not installed: `make setup` (apt-get install it)")
    port = free_port()
    log = workdir / "victoria-metrics.log"
    process: ServerProcess = LocalBinary(binary).start(
        [
            f"-storageDataPath={workdir / 'victoria-metrics'}",
            f"-httpListenAddr=127.0.0.1:{port}",
            "-retentionPeriod=1d",
            # By default the newest 30 s are hidden from queries, for samples still on
            # their way; here the test itself waits until they have arrived.
            "-search.latencyOffset=0s",
            # Range answers are cached and their start and end shifted to cache well; a
            # query here must see exactly the range it asks for.
            "-search.disableCache",
        ],
        log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ready(f"{url}/health", 30, process=process, what="victoria-metrics")
        except (ProcessExited, NotReady) as error:
            raise RuntimeError(f"{error}:\n{log.read_text()}") from None
        yield url
    finally:
        process.stop()


class PinnedNow:
    """Forwards GETs to a Prometheus-compatible server, answering "now" with ``at``: an
    instant query without a ``time`` is asked at ``at`` instead."""

    def __init__(self, upstream: str, at: float) -> None:
        self.upstream = upstream

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                params = urllib.parse.parse_qsl(query, keep_blank_values=True)
                if path.endswith("/api/v1/query") and "time" not in dict(params):
                    params.append(("time", f"{at:.3f}"))
                url = f"{upstream}{path}?{urllib.parse.urlencode(params)}"
                try:
                    with urllib.request.urlopen(url, timeout=30) as response:
                        status, body = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, body = error.code, error.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the run -------------------------------------------------------------------------------------


def api(url: str, path: str, **params: object) -> list[dict]:
    reply = http_json(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def labels_of(series: dict) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in series["metric"].items() if k not in EXTERNAL_LABELS))


def raw_samples(url: str, at: float, since: float) -> list[dict]:
    """Every raw sample from ``since`` to ``at`` of every series but Prometheus's own: a
    matrix."""
    window = f"{math.ceil(at - since)}s"
    selector = f'{{__name__=~".+",job!="prometheus"}}[{window}]'
    return api(url, "query", query=selector, time=f"{at:.3f}")


def newest(matrix: list[dict]) -> dict[tuple, float]:
    """The newest finite sample's time of each series (a store may leave NaN samples out)."""
    out = {}
    for series in matrix:
        finite = [float(t) for t, v in series["values"] if math.isfinite(float(v))]
        if finite:
            out[labels_of(series)] = max(finite)
    return out


class Run:
    def __init__(self, stack: AlertStack, store: str, start: float, at: float) -> None:
        self.stack = stack
        self.store = store
        self.start = start  # of the run, seconds (range queries begin here)
        self.at = at  # the fixed instant every comparison is made at


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[Run]:
    workdir = tmp_path_factory.mktemp("remote-write")
    with contextlib.ExitStack() as cleanup:
        store = cleanup.enter_context(victoria_metrics(workdir))
        remote_write = {
            "url": f"{store}/api/v1/write",
            # A test cannot wait the default 5 s per batch for every sample.
            "queue_config": {"batch_send_deadline": "1s"},
        }
        stack = AlertStack(workdir, prometheus_extra={"remote_write": [remote_write]})
        cleanup.callback(stack.close)
        cleanup.enter_context(fake_gpu_exporter(stack, NODE, gpus=2))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("UGRO_GPU_UUIDS", ",".join(FAKE_GPU_UUIDS[:2]))  # read by each rank
            job = TrainingJob(stack, JOB_ID, TRAINER_ARGS, node=NODE)
        cleanup.callback(job.stop)
        start = time.time()
        try:
            assert job.wait(timeout=180) == 0, job.log.read_text()[-3000:]
            # Deregistered: Prometheus has scraped the last values and marked the ranks gone.
            wait_for(
                lambda: not api(stack.prometheus_url, "query", query=f'up{{job_id="{JOB_ID}"}}'),
                30,
                "Prometheus to mark the ranks' series stale",
            )
        except BaseException:
            for log in sorted(workdir.rglob("*.log")):
                print(f"--- {log.name}", log.read_text()[-3000:], sep="\n")
            raise
        # Two seconds back: every scrape (1 s timeout) and rule evaluation stamped before it
        # has been appended by now, so no sample older than ``at`` reaches either server later.
        at = round(time.time() - 2, 3)

        def lagging() -> list[str]:
            """Series whose newest sample up to ``at`` the store does not have yet."""
            theirs = newest(raw_samples(store, at, start))
            return [
                f"{dict(key)}: Prometheus {t}, store {theirs.get(key)}"
                for key, t in newest(raw_samples(stack.prometheus_url, at, start)).items()
                if theirs.get(key, -math.inf) < t
            ]

        try:
            wait_for(lambda: not lagging(), 60, "the store to catch up with Prometheus")
        except AssertionError as error:
            behind = lagging()
            raise AssertionError(f"{error}; {len(behind)} series behind: {behind[:10]}") from None
        yield Run(stack, store, start, at)


# -- the comparisons -----------------------------------------------------------------------------


def substitute(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a dashboard variable left unsubstituted in {expr}"
    return expr


def _close(a: str, b: str) -> bool:
    x, y = float(a), float(b)
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return x == y or abs(x - y) <= max(RELATIVE_TOLERANCE * max(abs(x), abs(y)), ABSOLUTE_TOLERANCE)


def differences(prometheus: list[dict], store: list[dict]) -> list[str]:
    """How ``store``'s answer differs from ``prometheus``'s: missing and extra series, and the
    points of shared series that differ (first three and the largest relative difference).

    A point that is NaN on one side and absent on the other is no difference: VictoriaMetrics
    returns Prometheus's staleness markers as NaN points in a range selection (Prometheus
    returns none) and does not store NaN samples (Prometheus does); Grafana draws either as
    a gap."""
    ours = {labels_of(s): dict(s.get("values") or [s["value"]]) for s in prometheus}
    theirs = {labels_of(s): dict(s.get("values") or [s["value"]]) for s in store}
    for one, other in ((ours, theirs), (theirs, ours)):
        for key, points in one.items():
            for t in [t for t, v in points.items() if math.isnan(float(v))]:
                if t not in other.get(key, {}):
                    del points[t]
    ours = {k: v for k, v in ours.items() if v}
    theirs = {k: v for k, v in theirs.items() if v}
    found = [f"only in Prometheus: {dict(k)}" for k in ours.keys() - theirs.keys()]
    found += [f"only in the store: {dict(k)}" for k in theirs.keys() - ours.keys()]
    for key in sorted(ours.keys() & theirs.keys()):
        a, b = ours[key], theirs[key]
        bad = [t for t in sorted(a.keys() | b.keys()) if t not in a or t not in b]
        bad += [t for t in sorted(a.keys() & b.keys()) if not _close(a[t], b[t])]
        if not bad:
            continue
        shown = [(t, a.get(t), b.get(t)) for t in bad[:3]]
        worst = max(
            (
                abs(float(a[t]) - float(b[t])) / max(abs(float(a[t])), abs(float(b[t])), 1e-300)
                for t in a.keys() & b.keys()
                if math.isfinite(float(a[t]) - float(b[t]))
            ),
            default=math.nan,
        )
        found.append(
            f"{dict(key)}: {len(bad)} of {len(a.keys() | b.keys())} points differ, e.g. "
            f"(t, Prometheus, store) {shown}; largest relative difference {worst:.3g}"
        )
    return found


def test_the_store_holds_every_sample_prometheus_holds(run):
    ours = raw_samples(run.stack.prometheus_url, run.at, run.start)
    found = differences(ours, raw_samples(run.store, run.at, run.start))
    assert not found, f"{len(found)} differences:\n" + "\n".join(found)
    # The run is in it: both ranks' steps, the exporter's GPUs, the recorded series, the alert.
    names = {s["metric"]["__name__"] for s in ours}
    assert {"ugro_train_steps_total", "ugro_gpu_utilization_ratio", "ALERTS"} <= names
    assert any(name.startswith("job_rank:") for name in names)


def test_every_panel_query_answers_the_same_from_the_store(run):
    mismatches, compared = [], 0
    for path in DASHBOARD_FILES:
        for panel, target in targets(load(path)):
            expr = substitute(target["expr"])
            where = f"{path.stem} {panel['title']!r} {target['refId']}: {expr}"
            answers = []
            for url in (run.stack.prometheus_url, run.store):
                if target.get("instant"):
                    answers.append(api(url, "query", query=expr, time=f"{run.at:.3f}"))
                else:
                    params = {"start": f"{run.start:.3f}", "end": f"{run.at:.3f}", "step": "1"}
                    answers.append(api(url, "query_range", query=expr, **params))
            compared += bool(answers[0])
            found = [f"{where}\n    {d}" for d in differences(*answers)]
            known = KNOWN_DIFFERENCES.get(f"{path.stem}:{panel['title']}:{target['refId']}")
            if known and found:
                print(f"known difference ({known}):", *found, sep="\n")
            else:
                mismatches += found
    assert not mismatches, f"{len(mismatches)} differences:\n" + "\n".join(mismatches)
    assert compared > 30  # most panels had something to show


@pytest.fixture
def pinned(run):
    """Both servers behind proxies that answer "now" with the run's comparison instant."""
    proxies = [PinnedNow(url, run.at) for url in (run.stack.prometheus_url, run.store)]
    yield [p.url for p in proxies]
    for proxy in proxies:
        proxy.close()


def ugro(capsys, *argv: str) -> str:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def json_differences(ours: object, theirs: object, where: str = "") -> list[str]:
    """Where two JSON values differ, numbers compared as the panels' values are."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = [f"{where}.{k}: only one has it" for k in ours.keys() ^ theirs.keys()]
        for key in sorted(ours.keys() & theirs.keys()):
            found += json_differences(ours[key], theirs[key], f"{where}.{key}")
        return found
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [
            d
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for d in json_differences(a, b, f"{where}[{i}]")
        ]
    numbers = (int, float)
    if isinstance(ours, numbers) and isinstance(theirs, numbers) and _close(ours, theirs):
        return []
    return [] if ours == theirs else [f"{where}: Prometheus {ours!r}, store {theirs!r}"]


NUMBER = re.compile(r"\d[\d,]*(?:\.(\d+))?")


def same_as_shown(ours: str, theirs: str) -> bool:
    """Two lines of text that are equal, or that differ only in numbers by one unit in the
    last digit shown: a value on a rounding boundary (0.695 shown as 0.69 or 0.70) may round
    either way when the two agree to 1e-12 but not to the last bit."""
    if ours == theirs:
        return True
    if NUMBER.sub("#", ours) != NUMBER.sub("#", theirs):
        return False
    for a, b in zip(NUMBER.finditer(ours), NUMBER.finditer(theirs), strict=True):
        decimals = len(a.group(1) or "")
        x, y = (float(m.group(0).replace(",", "")) for m in (a, b))
        if abs(x - y) > 1.0001 * 10**-decimals:
            return False
    return True


def test_report_is_the_same_from_the_store(run, pinned, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UGRO_STATE_DIR", str(tmp_path))  # no launcher records here
    monkeypatch.setenv("COLUMNS", "120")
    texts = [
        ugro(capsys, "--prometheus", url, "report", JOB_ID).replace(url, "URL") for url in pinned
    ]
    reports = [
        json.loads(
            ugro(capsys, "--prometheus", url, "report", JOB_ID, "--json").replace(url, "URL")
        )
        for url in pinned
    ]
    assert reports[0]["status"] == "finished"
    assert reports[0]["work"]["steps"] == STEPS
    ours, theirs = (text.splitlines() for text in texts)
    if len(ours) == len(theirs):
        found = [
            f"text: Prometheus {a!r}, store {b!r}"
            for a, b in zip(ours, theirs, strict=True)
            # A line is known by its label, "tokens/s" in "  tokens/s     mean 6,668 ...".
            if not same_as_shown(a, b)
            and f"report text:{a.strip().split('  ')[0]}" not in KNOWN_DIFFERENCES
        ]
    else:
        found = [f"text: {line}" for line in difflib.unified_diff(ours, theirs, lineterm="")]
    found += [
        f"json: {d}"
        for d in json_differences(*reports)
        if f"report:{d.split(':')[0]}" not in KNOWN_DIFFERENCES
    ]
    assert not found, f"{len(found)} differences:\n" + "\n".join(found)


def test_watch_once_is_the_same_from_the_store(run, pinned, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UGRO_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "160")
    # The frame's clock and its "since" ages are read at the comparison instant too.
    monkeypatch.setattr(gather, "time", types.SimpleNamespace(time=lambda: run.at))
    alertmanager = run.stack.alertmanager_url
    outputs = [
        ugro(capsys, "--prometheus", url, "--alertmanager", alertmanager, "watch", JOB_ID, "--once")
        .replace(url, "URL")
        for url in pinned
    ]  # fmt: skip
    assert outputs[0] == outputs[1]
    assert JOB_ID in outputs[0]


# -- the documented configuration ----------------------------------------------------------------

PROMETHEUS_DIR = ROOT / "prometheus"


@pytest.fixture
def promtool():
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed: `make setup`")


def test_prometheus_yml_with_the_remote_write_example_is_valid(tmp_path, promtool):
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    example = yaml.safe_load((PROMETHEUS_DIR / "remote-write.example.yml").read_text())
    assert list(example) == ["remote_write"]
    config.update(example)
    # Relative rule paths are read from the config's folder: keep them pointing at the files.
    config["rule_files"] = [str(PROMETHEUS_DIR / path) for path in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    checked = subprocess.run(
        ["promtool", "check", "config", str(path)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_agent_mode_example_is_valid_and_refuses_rules(tmp_path, promtool):
    example = PROMETHEUS_DIR / "agent-mode.example.yml"
    checked = subprocess.run(
        ["promtool", "check", "config", "--agent", str(example)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Which is why the recording and alert rules must run elsewhere (vmalert, a ruler).
    config = yaml.safe_load(example.read_text())
    config["rule_files"] = [str(PROMETHEUS_DIR / "rules" / "recording.yml")]
    path = tmp_path / "agent.yml"
    path.write_text(yaml.safe_dump(config))
    refused = subprocess.run(
        ["promtool", "check", "config", "--agent", str(path)], capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "rule_files is not allowed in agent mode" in refused.stdout + refused.stderr


def test_an_agent_forwards_what_it_scrapes_to_the_store(tmp_path):
    """Debian's Prometheus 2.42 runs the agent-mode example (addresses changed) and the store
    receives its scrapes."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed: `make setup`")
    with victoria_metrics(tmp_path) as store:
        port = free_port()
        config = yaml.safe_load((PROMETHEUS_DIR / "agent-mode.example.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s")
        config["scrape_configs"] = [
            {"job_name": "prometheus-agent", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
        ]
        config["remote_write"][0]["url"] = f"{store}/api/v1/write"
        config["remote_write"][0]["queue_config"]["batch_send_deadline"] = "1s"
        path = tmp_path / "agent.yml"
        path.write_text(yaml.safe_dump(config))
        log = tmp_path / "agent.log"
        agent = LocalBinary(binary).start(
            [
                "--enable-feature=agent",
                f"--config.file={path}",
                f"--storage.agent.path={tmp_path / 'wal'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            log,
        )
        try:
            query = 'up{job="prometheus-agent",cluster="ugro"} == 1'
            try:
                wait_for(
                    lambda: api(store, "query", query=query), 60, "the agent's scrapes in the store"
                )
            except AssertionError as error:
                raise AssertionError(f"{error}:\n{log.read_text()[-3000:]}") from None
        finally:
            agent.stop()
