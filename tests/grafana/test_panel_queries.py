"""Every panel query of both dashboards returns data from a real Prometheus.

No Grafana server can run here, so the dashboards are proven where they can break: their
PromQL. One short real run feeds a real Prometheus (the project's configuration and recording
rules, 1 s intervals): the reference trainer on 2 CPU ranks under torchrun, each rank told its
GPU's UUID, and ugro-exporter with its scripted two-GPU NVML double. Rank 1's input pipeline is
slowed and GPU 0 reports an XID, so the alert panels have something to show; the ranks
checkpoint every 50 steps, so the checkpoint panels do. Each target's
expression, with the dashboard variables replaced by values from that run and
``$__rate_interval`` by a concrete window, then goes through Prometheus's HTTP API the way
Grafana sends it (range queries over the run, instant queries at its end) and must return at
least one series.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.parse

import pytest

from tests.grafana.dashboards import DASHBOARD_FILES, load, targets, variables
from tests.support import wait_for
from tests.support.fake_gpu import FAKE_GPU_UUIDS, fake_gpu_exporter
from tests.support.models import SMALL_MODEL
from tests.support.net import http_json
from tests.support.stack import AlertStack
from tests.support.training import TrainingJob

JOB_ID = "dash-run"
NODE = "node-a"
RATE_INTERVAL = "10s"  # what Grafana picks for a 1 s scrape interval at a short time range
SUBSTITUTIONS = {
    "$__rate_interval": RATE_INTERVAL,
    "$__interval": "1s",
    "$job_id": JOB_ID,
    "$node": NODE,
    "$rank": "(0|1)",  # Grafana's rendering of a multi-value selection in a regex matcher
}


def substitute(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a dashboard variable left unsubstituted in {expr}"
    return expr


def firing_alerts(stack: AlertStack, **labels: str) -> list[str]:
    matchers = "".join(f', {name}="{value}"' for name, value in labels.items())
    return [
        series["metric"]["alertname"]
        for series in stack.query(f'ALERTS{{alertstate="firing"{matchers}}}')
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A live run with a straggling rank and an XID, every alert panel's reason to show."""
    workdir = tmp_path_factory.mktemp("dashboards")
    control = workdir / "nvml-control"
    control.mkdir()
    with contextlib.ExitStack() as cleanup:
        stack = AlertStack(workdir)
        cleanup.callback(stack.close)
        cleanup.enter_context(fake_gpu_exporter(stack, NODE, gpus=2, control_dir=control))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("UGRO_GPU_UUIDS", ",".join(FAKE_GPU_UUIDS[:2]))  # read by each rank
            job = TrainingJob(
                stack,
                JOB_ID,
                # A declared peak: CPU ranks have none of their own, and the MFU panel needs one.
                [
                    *SMALL_MODEL,
                    "--steps",
                    "1000000",
                    "--fault-rank=1",
                    "--slow-factor=4",
                    "--peak-flops",
                    "1e12",
                    # Checkpoints for the "Where the time went" row's checkpoint panels.
                    "--checkpoint-every",
                    "50",
                ],
                node=NODE,
            )
        cleanup.callback(job.stop)
        started = time.time()
        try:
            wait_for(
                lambda: len(stack.query(f'up{{job_id="{JOB_ID}"}} == 1')) == 2,
                90,
                "both ranks up",
            )
            wait_for(
                lambda: stack.query(f'job_rank:ugro_gpu_utilization:ratio{{job_id="{JOB_ID}"}}'),
                60,
                "the ranks' GPUs joined with the exporter's",
            )
            (control / "xid").write_text("0 79\n")  # GPU 0 fell off the bus, the driver says
            wait_for(
                lambda: "TrainingStragglerRank" in firing_alerts(stack, job_id=JOB_ID),
                120,
                "the straggler alert firing",
            )
            wait_for(
                lambda: firing_alerts(stack, alertname="GpuXidError", node=NODE),
                60,
                "the XID alert firing",
            )
            wait_for(
                lambda: stack.query(f'ugro_train_checkpoints_total{{job_id="{JOB_ID}"}}'),
                60,
                "a checkpoint",
            )
        except BaseException:
            for log in sorted(workdir.rglob("*.log")):
                print(f"--- {log.name}", log.read_text()[-3000:], sep="\n")
            raise
        # A few more scrapes, so every rate window has points.
        time.sleep(3)
        yield stack, started, time.time()


def run_target(stack: AlertStack, target: dict, start: float, end: float) -> list[dict]:
    expr = substitute(target["expr"])
    if target.get("instant"):
        params = {"query": expr, "time": f"{end:.3f}"}
        url = f"{stack.prometheus_url}/api/v1/query?{urllib.parse.urlencode(params)}"
    else:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"}
        url = f"{stack.prometheus_url}/api/v1/query_range?{urllib.parse.urlencode(params)}"
    reply = http_json(url)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


ALL_TARGETS = [
    pytest.param(panel, target, id=f"{path.stem}:{panel['id']}:{panel['title']}:{target['refId']}")
    for path in DASHBOARD_FILES
    for panel, target in targets(load(path))
]


@pytest.mark.parametrize(("panel", "target"), ALL_TARGETS)
def test_every_panel_query_returns_data(run, panel, target):
    stack, start, end = run
    result = run_target(stack, target, start, end)
    assert result, f"{panel['title']!r} {target['refId']}: no series for {target['expr']}"
    # For the closing note: which panel ran what, and how much came back.
    print(json.dumps({"panel": panel["title"], "refId": target["refId"], "series": len(result)}))


def test_the_alert_panels_name_the_injected_faults(run):
    stack, start, end = run
    training = load(next(p for p in DASHBOARD_FILES if p.stem == "ugro-training"))
    [table] = [p for p in training["panels"] if p.get("title") == "Firing alerts"]
    rows = run_target(stack, table["targets"][0], start, end)
    names = {series["metric"]["alertname"] for series in rows}
    # The job's straggler, and its node's XID (a GPU alert carries the node, not the job).
    assert {"TrainingStragglerRank", "GpuXidError"} <= names
    [annotation] = training["annotations"]["list"]
    marks = run_target(stack, {"expr": annotation["expr"]}, start, end)
    assert {series["metric"]["alertname"] for series in marks} >= {"TrainingStragglerRank"}


def test_the_variables_list_the_runs_job_nodes_and_ranks(run):
    """Grafana resolves label_values(SERIES, LABEL) through the series API; so does this."""
    stack, start, end = run
    seen = {}
    for path in DASHBOARD_FILES:
        for name, variable in variables(load(path)).items():
            if variable["type"] != "query":
                continue
            series, label = _label_values(variable["query"]["query"])
            params = {"match[]": substitute(series), "start": f"{start:.0f}", "end": f"{end:.0f}"}
            url = f"{stack.prometheus_url}/api/v1/series?{urllib.parse.urlencode(params)}"
            values = {item.get(label) for item in http_json(url)["data"]}
            seen[f"{path.stem}:{name}"] = values
    assert seen == {
        "ugro-cluster:node": {NODE},
        "ugro-training:job_id": {JOB_ID},
        "ugro-training:node": {NODE},
        "ugro-training:rank": {"0", "1"},
    }


def _label_values(text: str) -> tuple[str, str]:
    assert text.startswith("label_values(") and text.endswith(")"), text
    series, label = text[len("label_values(") : -1].rsplit(",", 1)
    return series.strip(), label.strip()
