"""The cost of watching a job as it grows: 8, 128 and 1,024 ranks feeding one real Prometheus.

For each size in turn, a fresh Prometheus (fresh TSDB) and Alertmanager run the project's own
configuration (prometheus/prometheus.yml with its production 5 s scrape and evaluation
intervals and 4 s scrape timeout, the recording rules, the alert rules rendered from
alerts/thresholds.yml unchanged); only addresses and file paths are changed, and Slack's
webhook points at a local counter. One job of SIZE ranks, 8 per node, so SIZE / 8 node
exporters: worker processes (benchmarks/scale_sim.py, up to 32 nodes each) host the ranks'
real ``Telemetry`` and the nodes' real ``Exporter`` (over the scripted NVML double), each on
its own loopback port, and the job's and nodes' file_sd target files are written by
``ugro.launcher.targets``, as ugro-launch writes them. Values evolve: steps, phases,
checkpoints, a decaying noisy loss, one straggling rank, drifting GPU readings.

After every target is up and ``--warmup-seconds`` have passed (the rules' longest window is
5 m), it measures, per size:

* ``series``: ``prometheus_tsdb_head_series``; Prometheus's CPU (cores, from its own CPU
  seconds over the last ``--quiet-seconds`` of the warm-up, with nothing querying it) and its
  peak RSS over that window;
* ``rule_eval_s``: each rule group's ``evaluationTime`` (``/api/v1/rules``), sampled every
  evaluation over the same window; the median cycle summed over groups (``rule_eval_max_s``:
  each group's slowest, summed);
* ``panel_p95_s``: every target of both dashboards, sent as Grafana sends it (POST; range
  queries over the dashboard's default range with the step Grafana picks for 1,000 points,
  ``$__rate_interval`` = 20 s, instant queries at the end; "All" for node and rank), one after
  another, ``--repeats`` rounds; the slowest panel's p95 (per-panel p95s in the table);
* ``watch_frame_s``: in this process, what ``ugro watch`` does for one frame (``gather`` from
  Prometheus and Alertmanager with its timeouts, then ``render``), the median of 5;
* ``report_s``: likewise ``ugro report JOB`` (``full_report`` and ``render_report``),
  the median of 3.
* then the simulator stops, and every rule's expression (as an instant query) and every panel
  is timed again at a moment before the stop: ``rule_eval_isolated_s``, ``panel_p95_isolated_s``.

docs/scale.md has the method, the measured curve and what it predicts.

    python benchmarks/scale.py                                # 8, 128, 1024: about 45 min
    python benchmarks/scale.py --sizes 8 --warmup-seconds 30  # a smoke run, about 1 min

Before the last line it prints the slowest five queries and rules of the largest size. The
last line printed is one JSON object (keys per size: ``series_1024``, ``panel_p95_s_1024``...).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import psutil
import yaml
from rich.console import Console

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ugro.alerts.rules_file import render as render_alert_rules
from ugro.common.ports import free_ports
from ugro.common.processes import stop_process_group, wait_until_ready
from ugro.console import report as report_command
from ugro.console import watch as watch_command
from ugro.console.gather import gather, recorded_end
from ugro.console.localstack import (
    NotificationReceiver,
    alertmanager_config,
    find_binary,
    prometheus_config,
)
from ugro.console.report_text import render_report
from ugro.console.servers import Alertmanager, Prometheus, QueryError, Unreachable
from ugro.console.snapshot import with_record
from ugro.launcher.targets import LocalTargets, RankEndpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIMULATOR = ROOT / "benchmarks" / "scale_sim.py"
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"
RANKS_PER_NODE = 8
NODES_PER_WORKER = 32
SCRAPE_INTERVAL_SECONDS = 5.0  # prometheus/prometheus.yml
# Grafana: maxDataPoints of a panel about 1,000 px wide; the datasource's timeInterval (5 s,
# grafana/provisioning) is the smallest step; $__rate_interval is max(interval + scrape
# interval, 4 scrape intervals).
GRAFANA_MAX_POINTS = 1000
TARGETS = {"panel_p95_s": 1.0, "rule_eval_s": 1.0, "watch_frame_s": 2.0}
TIME_RANGES = {"now-1h": 3600.0, "now-3h": 3 * 3600.0, "now-6h": 6 * 3600.0}


def sig(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def grafana_interval(range_seconds: float) -> float:
    """Grafana's interval for a time range (kbn.roundInterval), at least the scrape interval."""
    raw = range_seconds / GRAFANA_MAX_POINTS
    for below, rounded in (
        (1.5, 1),
        (3.5, 2),
        (7.5, 5),
        (12.5, 10),
        (17.5, 15),
        (25, 20),
        (45, 30),
        (90, 60),
        (210, 120),
        (450, 300),
    ):
        if raw < below:
            return max(float(rounded), SCRAPE_INTERVAL_SECONDS)
    return 600.0


# -- the stack ---------------------------------------------------------------------------------


class Stack:
    """Prometheus and Alertmanager with the production configuration, under ``workdir``."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.targets = LocalTargets(workdir / "targets")
        for folder in ("ranks", "nodes"):
            (self.targets.directory / folder).mkdir(parents=True, exist_ok=True)
        self.notifications = 0
        self.receiver = NotificationReceiver(self._notified)
        self.prometheus_port, self.alertmanager_port = free_ports(2)
        self.prometheus_url = f"http://127.0.0.1:{self.prometheus_port}"
        self.alertmanager_url = f"http://127.0.0.1:{self.alertmanager_port}"
        self.processes: list[subprocess.Popen] = []
        try:
            self._start_alertmanager()
            self.prometheus = self._start_prometheus()
        except BaseException:
            self.close()
            raise

    def _notified(self, title: str, text: str) -> None:
        self.notifications += 1

    def _start(self, argv: list[str], log: pathlib.Path, ready: str) -> subprocess.Popen:
        with open(log, "wb") as output:
            process = subprocess.Popen(
                argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(process)
        wait_until_ready(ready, 60, process=process, what=argv[0])
        return process

    def _start_alertmanager(self) -> None:
        directory = self.workdir / "alertmanager"
        directory.mkdir(parents=True)
        url_file = directory / "slack_webhook_url"
        url_file.write_text(self.receiver.url + "\n")
        config = directory / "alertmanager.yml"
        config.write_text(yaml.safe_dump(alertmanager_config(slack_url_file=url_file)))
        binary = find_binary(
            "prometheus-alertmanager", "alertmanager", package="prometheus-alertmanager"
        )
        self._start(
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
                "--cluster.listen-address=",
            ],
            directory / "alertmanager.log",
            f"{self.alertmanager_url}/-/ready",
        )

    def _start_prometheus(self) -> subprocess.Popen:
        directory = self.workdir / "prometheus"
        directory.mkdir(parents=True)
        rules = directory / "alert-rules.yml"
        rules.write_text(render_alert_rules())  # production thresholds and `for:` windows
        config = prometheus_config(
            targets_dir=self.targets.directory,
            alert_rules=rules,
            alertmanager=f"127.0.0.1:{self.alertmanager_port}",
            own=f"127.0.0.1:{self.prometheus_port}",
            interval="5s",
        )
        config["global"]["scrape_timeout"] = "4s"  # prometheus/prometheus.yml's
        path = directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return self._start(
            [
                find_binary("prometheus", package="prometheus"),
                f"--config.file={path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
            ],
            directory / "prometheus.log",
            f"{self.prometheus_url}/-/ready",
        )

    def api(self, path: str, params: dict | None = None, post: bool = False) -> dict:
        url = f"{self.prometheus_url}/api/v1/{path}"
        body = urllib.parse.urlencode(params or {})
        if post:
            request = urllib.request.Request(url, data=body.encode(), method="POST")
        else:
            request = urllib.request.Request(f"{url}?{body}" if body else url)
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def value(self, expr: str) -> float:
        result = self.api("query", {"query": expr})["data"]["result"]
        return float(result[0]["value"][1]) if result else math.nan

    def close(self) -> None:
        for process in reversed(self.processes):
            stop_process_group(process, 10)
        self.receiver.close()


# -- the simulated job -------------------------------------------------------------------------


class SimulatedJob:
    """``size`` ranks on ``size / 8`` nodes in worker processes, registered with Prometheus."""

    def __init__(self, stack: Stack, job_id: str, size: int, step_seconds: float) -> None:
        self.workers: list[subprocess.Popen] = []
        nodes = max(1, size // RANKS_PER_NODE)
        self.nodes = nodes
        endpoints: list[RankEndpoint] = []
        try:
            for first in range(0, nodes, NODES_PER_WORKER):
                count = min(NODES_PER_WORKER, nodes - first)
                log = stack.workdir / f"worker-{first}.log"
                with open(log, "wb") as log_file:  # the child keeps its own descriptor
                    worker = subprocess.Popen(
                        [
                            sys.executable,
                            str(SIMULATOR),
                            *("--job-id", job_id, "--world-size", str(size)),
                            *("--first-node", str(first), "--nodes", str(count)),
                            *("--step-seconds", str(step_seconds), "--seed", str(first)),
                        ],
                        stdout=subprocess.PIPE,
                        stderr=log_file,
                        text=True,
                        cwd=ROOT,
                    )
                self.workers.append(worker)
            for worker in self.workers:
                line = worker.stdout.readline()
                if not line:
                    raise RuntimeError(f"a simulator worker exited early; see {stack.workdir}")
                ports = json.loads(line)
                for rank, node, port in ports["ranks"]:
                    endpoints.append(RankEndpoint("127.0.0.1", port, rank, node))
                for node, port in ports["nodes"]:
                    stack.targets.register_node(node, "127.0.0.1", port)
            stack.targets.register_job(job_id, endpoints)
        except BaseException:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def close(self) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


# -- measuring ---------------------------------------------------------------------------------


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def quiet_window(stack: Stack, seconds: float) -> dict:
    """Prometheus's own CPU and RSS and its rule groups' evaluation times over ``seconds``,
    with nothing querying it."""
    process = psutil.Process(stack.prometheus.pid)
    groups: dict[str, dict[str, float]] = {}  # group -> lastEvaluation -> evaluationTime
    rules: dict[str, float] = {}  # "group/rule" -> its slowest evaluation
    rss = []
    cpu_before = sum(process.cpu_times()[:2])
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        rss.append(process.memory_info().rss)
        for group in stack.api("rules")["data"]["groups"]:
            if group.get("lastEvaluation", "").startswith("0001"):
                continue  # not evaluated yet
            groups.setdefault(group["name"], {})[group["lastEvaluation"]] = group["evaluationTime"]
            for rule in group["rules"]:
                key = f"{group['name']}/{rule['name']}"
                rules[key] = max(rules.get(key, 0.0), rule.get("evaluationTime", 0.0))
        time.sleep(SCRAPE_INTERVAL_SECONDS / 2)
    cpu = (sum(process.cpu_times()[:2]) - cpu_before) / (time.monotonic() - started)
    per_group = {
        name: {"median_s": statistics.median(v.values()), "max_s": max(v.values())}
        for name, v in groups.items()
    }
    return {
        "cpu_cores": cpu,
        "rss_mb": max(rss) / 2**20,
        "groups": per_group,
        "rule_eval_s": sum(g["median_s"] for g in per_group.values()),
        "rule_eval_max_s": sum(g["max_s"] for g in per_group.values()),
        "slowest_rules": sorted(rules.items(), key=lambda kv: -kv[1])[:5],
    }


def dashboard_queries(job_id: str, end: float) -> list[dict]:
    """Every request Grafana sends to draw both dashboards at ``end`` with "All" nodes and
    ranks: one per panel target, and one per query variable."""
    substitutions = {"$job_id": job_id, "$node": ".*", "$rank": ".*"}
    queries = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text())
        range_s = TIME_RANGES[dashboard["time"]["from"]]
        step = grafana_interval(range_s)
        rate_interval = max(step + SCRAPE_INTERVAL_SECONDS, 4 * SCRAPE_INTERVAL_SECONDS)
        aligned_end = math.floor(end / step) * step
        start = aligned_end - range_s
        values = {
            **substitutions,
            "$__rate_interval": f"{rate_interval:g}s",
            "$__interval": f"{step:g}s",
        }

        def filled(expr: str, values: dict = values, path: pathlib.Path = path) -> str:
            for name, value in values.items():
                expr = expr.replace(name, value)
            if "$" in expr:
                raise ValueError(f"{path.name}: a variable left unsubstituted in {expr!r}")
            return expr

        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                name = f"{path.stem}: {panel['title']} {target['refId']}"
                expr = filled(target["expr"])
                if target.get("instant"):
                    params = {"query": expr, "time": f"{end:.3f}"}
                    queries.append({"name": name, "path": "query", "params": params})
                else:
                    params = {
                        "query": expr,
                        "start": f"{start:.0f}",
                        "end": f"{aligned_end:.0f}",
                        "step": f"{step:g}",
                    }
                    queries.append({"name": name, "path": "query_range", "params": params})
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable["type"] != "query":
                continue
            text = variable["query"]["query"]
            series, label = text[len("label_values(") : -1].rsplit(",", 1)
            params = {
                "match[]": filled(series.strip()),
                "start": f"{end - range_s:.0f}",
                "end": f"{end:.0f}",
            }
            queries.append(
                {
                    "name": f"{path.stem}: variable {variable['name']}",
                    "path": f"label/{label.strip()}/values",
                    "params": params,
                }
            )
    return queries


def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def answer_size(data: dict | list) -> tuple[int, int]:
    """Series (or label values) and points in an answer: what a query's cost grows with."""
    if isinstance(data, list):  # label values
        return len(data), len(data)
    result = data["result"]
    if data["resultType"] == "matrix":
        return len(result), sum(len(series["values"]) for series in result)
    if data["resultType"] == "vector":
        return len(result), len(result)
    return 1, 1  # a scalar


def time_queries(stack: Stack, job_id: str, repeats: int, end: float | None = None) -> list[dict]:
    """Each query's p95 and median over ``repeats`` rounds, slowest first; the dashboards
    drawn at ``end`` (default now)."""
    queries = dashboard_queries(job_id, time.time() if end is None else end)
    times: dict[str, list[float]] = {q["name"]: [] for q in queries}
    sizes: dict[str, tuple[int, int]] = {}
    for _ in range(repeats):
        for query in queries:
            started = time.perf_counter()
            # Grafana POSTs queries (the datasource's httpMethod); label values are GETs.
            post = query["path"].startswith("query")
            reply = stack.api(query["path"], query["params"], post=post)
            times[query["name"]].append(time.perf_counter() - started)
            if reply.get("status") != "success":
                raise RuntimeError(f"{query['name']}: {reply}")
            sizes[query["name"]] = answer_size(reply["data"])
    rows = [
        {
            "name": q["name"],
            "p95_s": p95(times[q["name"]]),
            "median_s": statistics.median(times[q["name"]]),
            "expr": q["params"].get("query") or q["params"].get("match[]"),
            "series": sizes[q["name"]][0],
            "points": sizes[q["name"]][1],
            "empty": sizes[q["name"]][0] == 0,
        }
        for q in queries
    ]
    return sorted(rows, key=lambda row: -row["p95_s"])


def isolated_rule_costs(stack: Stack, at: float, rounds: int) -> dict:
    """Each rule's expression as an instant query at ``at``, in turn as Prometheus evaluates a
    group, once nothing is scraped any more: what a rule costs on a core of its own. The
    median of ``rounds`` per rule, summed."""
    groups = stack.api("rules")["data"]["groups"]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for group in groups:
            for rule in group["rules"]:
                started = time.perf_counter()
                stack.api("query", {"query": rule["query"], "time": f"{at:.3f}"}, post=True)
                times.setdefault((group["name"], rule["name"]), []).append(
                    time.perf_counter() - started
                )
    per_rule = {key: statistics.median(values) for key, values in times.items()}
    per_group: dict[str, float] = {}
    for (group, _), seconds in per_rule.items():
        per_group[group] = per_group.get(group, 0.0) + seconds
    slowest = sorted(per_rule.items(), key=lambda kv: -kv[1])[:5]
    return {
        "rule_eval_isolated_s": sum(per_rule.values()),
        "groups_isolated": per_group,
        "slowest_rules_isolated": [(f"{g}/{r}", seconds) for (g, r), seconds in slowest],
    }


def time_watch_and_report(stack: Stack, job_id: str) -> dict:
    prometheus = Prometheus(stack.prometheus_url, timeout=watch_command.QUERY_TIMEOUT_SECONDS)
    alertmanager = Alertmanager(stack.alertmanager_url, timeout=watch_command.QUERY_TIMEOUT_SECONDS)
    frames, complete = [], True
    for _ in range(5):
        started = time.perf_counter()
        frame = with_record(gather(job_id, prometheus, alertmanager), recorded_end(job_id))
        Console(file=io.StringIO(), width=160).print(watch_command.render(frame))
        frames.append(time.perf_counter() - started)
        complete = complete and frame.complete
    reporting = Prometheus(stack.prometheus_url, timeout=report_command.QUERY_TIMEOUT_SECONDS)
    reports, report_error = [], None
    for _ in range(3):
        started = time.perf_counter()
        try:
            report = report_command.full_report(reporting, job_id, None)
        except (Unreachable, QueryError) as error:
            # What `ugro report` would print and exit on: keep the time it took to fail.
            reports.append(time.perf_counter() - started)
            report_error = str(error)
            break
        Console(file=io.StringIO(), width=160).print(render_report(report))
        reports.append(time.perf_counter() - started)
    return {
        "watch_frame_s": statistics.median(frames),
        "watch_frame_max_s": max(frames),
        "watch_frame_complete": complete,
        "report_s": statistics.median(reports),
        "report_max_s": max(reports),
        "report_error": report_error,
    }


def measure_size(size: int, args: argparse.Namespace) -> dict:
    job_id = f"scale-{size}"
    with contextlib.ExitStack() as cleanup:
        workdir = pathlib.Path(
            cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ugro-scale-"))
        )
        os.environ["UGRO_STATE_DIR"] = str(workdir / "state")  # no launcher record: none read
        stack = Stack(workdir)
        cleanup.callback(stack.close)
        job = SimulatedJob(stack, job_id, size, args.step_seconds)
        cleanup.callback(job.close)
        expected = size + job.nodes
        up = 'count(up{job=~"ugro-ranks|ugro-nodes"} == 1)'
        wait_until(lambda: stack.value(up) == expected, 180, f"{expected} targets up")
        print(f"[{size}] {expected} targets up; warming up {args.warmup_seconds:g} s", flush=True)
        time.sleep(max(0.0, args.warmup_seconds - args.quiet_seconds))
        quiet = quiet_window(stack, min(args.quiet_seconds, args.warmup_seconds))
        series = stack.value("prometheus_tsdb_head_series")
        targets_up = stack.value(up)
        scrape_max = stack.value('max(scrape_duration_seconds{job=~"ugro-ranks|ugro-nodes"})')
        print(
            f"[{size}] series {series:.0f}, Prometheus {quiet['cpu_cores']:.2f} cores "
            f"{quiet['rss_mb']:.0f} MB, rules {quiet['rule_eval_s']:.3f} s/cycle "
            f"(max {quiet['rule_eval_max_s']:.3f}); timing the dashboards' queries",
            flush=True,
        )
        queries = time_queries(stack, job_id, args.repeats)
        console = time_watch_and_report(stack, job_id)
        # The same work again with the simulator stopped, at a moment before it stopped: what
        # the rules and panels cost without ingestion competing for this machine's cores.
        at = time.time() - 2 * SCRAPE_INTERVAL_SECONDS
        job.close()
        print(f"[{size}] simulator stopped; timing rules and panels without ingestion", flush=True)
        isolated = isolated_rule_costs(stack, at, args.isolated_repeats)
        isolated_queries = time_queries(stack, job_id, args.isolated_repeats, end=at)
        slowest = queries[0]
        print(
            f"[{size}] slowest panel p95 {slowest['p95_s']:.3f} s ({slowest['name']}); watch "
            f"frame {console['watch_frame_s']:.3f} s, report {console['report_s']:.3f} s; "
            f"queries without data: {[q['name'] for q in queries if q['empty']] or 'none'}",
            flush=True,
        )
        print(
            f"[{size}] without ingestion: rules {isolated['rule_eval_isolated_s']:.3f} s/cycle, "
            f"slowest panel p95 {isolated_queries[0]['p95_s']:.3f} s "
            f"({isolated_queries[0]['name']})",
            flush=True,
        )
        return {
            "size": size,
            "nodes": job.nodes,
            "series": series,
            "targets_up": targets_up,
            "targets_expected": expected,
            "max_scrape_s": scrape_max,
            "notifications": stack.notifications,
            **quiet,
            "queries": queries,
            **console,
            **isolated,
            "queries_isolated": isolated_queries,
        }


def print_tables(result: dict) -> None:
    size = result["size"]
    print(f"\nSlowest five queries at {size} ranks (p95 of {ARGS.repeats} runs):")
    print("| # | panel / variable | p95 s | median s | series | points | query |")
    print("|---|---|---|---|---|---|---|")
    for i, row in enumerate(result["queries"][:5], start=1):
        expr = " ".join(row["expr"].split())
        expr = expr if len(expr) <= 110 else expr[:107] + "..."
        print(
            f"| {i} | {row['name']} | {row['p95_s']:.3f} | {row['median_s']:.3f} "
            f"| {row['series']} | {row['points']} | `{expr}` |"
        )
    print(f"\nThe same five without ingestion (p95 of {ARGS.isolated_repeats} runs):")
    isolated = {row["name"]: row for row in result["queries_isolated"]}
    for row in result["queries"][:5]:
        print(f"  {isolated[row['name']]['p95_s']:.3f} s  {row['name']}")
    print(f"\nRule groups at {size} ranks (evaluationTime over the quiet window):")
    print("| group | median s | max s | without ingestion s |")
    print("|---|---|---|---|")
    for name, group in sorted(result["groups"].items(), key=lambda kv: -kv[1]["max_s"]):
        alone = result["groups_isolated"].get(name, math.nan)
        print(f"| {name} | {group['median_s']:.4f} | {group['max_s']:.4f} | {alone:.4f} |")
    print(f"\nSlowest five rules at {size} ranks (max evaluationTime):")
    for name, seconds in result["slowest_rules"]:
        print(f"  {seconds:.4f} s  {name}")
    print(f"\nSlowest five rules at {size} ranks without ingestion (as instant queries):")
    for name, seconds in result["slowest_rules_isolated"]:
        print(f"  {seconds:.4f} s  {name}")
    print()


ARGS: argparse.Namespace


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="8,128,1024", help="ranks per run (multiples of 8)")
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=360.0,
        help="after every target is up, before measuring (default 360: the 5 m windows fill)",
    )
    parser.add_argument(
        "--quiet-seconds",
        type=float,
        default=60.0,
        help="the end of the warm-up over which CPU, RSS and rule times are sampled (default 60)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="rounds of dashboard queries")
    parser.add_argument(
        "--isolated-repeats",
        type=int,
        default=5,
        help="rounds of rule and dashboard queries once the simulator has stopped (default 5)",
    )
    parser.add_argument("--step-seconds", type=float, default=1.0, help="a training step's time")
    parser.add_argument(
        "--details", type=pathlib.Path, help="also write every size's full figures (JSON) here"
    )
    args = ARGS = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: expected numbers separated by commas")
    bad = [s for s in sizes if s < 8 or s % RANKS_PER_NODE]
    if not sizes or bad:
        parser.error(f"--sizes {args.sizes!r}: expected multiples of {RANKS_PER_NODE}, >= 8")
    if args.warmup_seconds < 10 or args.quiet_seconds < 10:
        parser.error("expected --warmup-seconds >= 10 and --quiet-seconds >= 10")
    if args.repeats < 1 or args.isolated_repeats < 1:
        parser.error("expected --repeats >= 1 and --isolated-repeats >= 1")

    # SIGTERM unwinds like Ctrl-C, so the servers and workers of the size in progress stop too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = [measure_size(size, args) for size in sizes]
    if args.details:
        args.details.write_text(json.dumps(results, indent=1) + "\n")
    print_tables(results[-1])
    summary: dict[str, object] = {
        "benchmark": "scale",
        "job": "one job per size, 8 ranks per node, one exporter (8 GPUs) per node",
        "intervals": {"scrape": "5s", "scrape_timeout": "4s", "evaluation": "5s"},
        "warmup_s": args.warmup_seconds,
        "repeats": args.repeats,
        "rule_eval_s": "median evaluation cycle, summed over rule groups",
        "cpu_cores": os.cpu_count(),
    }
    for r in results:
        n = r["size"]
        summary.update(
            {
                f"series_{n}": int(r["series"]),
                f"targets_up_{n}": f"{r['targets_up']:.0f}/{r['targets_expected']}",
                f"prometheus_cpu_cores_{n}": sig(r["cpu_cores"]),
                f"prometheus_rss_mb_{n}": sig(r["rss_mb"]),
                f"rule_eval_s_{n}": sig(r["rule_eval_s"]),
                f"rule_eval_max_s_{n}": sig(r["rule_eval_max_s"]),
                f"panel_p95_s_{n}": sig(r["queries"][0]["p95_s"]),
                f"rule_eval_isolated_s_{n}": sig(r["rule_eval_isolated_s"]),
                f"panel_p95_isolated_s_{n}": sig(r["queries_isolated"][0]["p95_s"]),
                f"slowest_panel_{n}": r["queries"][0]["name"],
                f"watch_frame_s_{n}": sig(r["watch_frame_s"]),
                f"report_s_{n}": sig(r["report_s"]),
                f"report_error_{n}": r["report_error"],
                f"watch_frame_complete_{n}": r["watch_frame_complete"],
            }
        )
    largest = results[-1]
    figures = {**largest, "panel_p95_s": largest["queries"][0]["p95_s"]}
    summary["targets_met"] = {name: figures[name] <= limit for name, limit in TARGETS.items()}
    summary["targets_met_without_ingestion"] = {
        "panel_p95_s": largest["queries_isolated"][0]["p95_s"] <= TARGETS["panel_p95_s"],
        "rule_eval_s": largest["rule_eval_isolated_s"] <= TARGETS["rule_eval_s"],
    }
    summary["targets_at"] = largest["size"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
