"""The committed dashboards are what the code generates, and every panel is complete: an id, a
unit, a description, targets with refIds, rate windows from Grafana, recording rules used."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.grafana.dashboards import (
    DASHBOARD_FILES,
    ROOT,
    load,
    panels,
    targets,
    variables,
)
from ugro.catalogue import names, recording
from ugro.catalogue.promql import RANK_GPUS
from ugro.grafana import __main__ as grafana_cli

PROVISIONED_DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "ugro.yml"
RECORDING_RULES = ROOT / "prometheus" / "rules" / "recording.yml"
ALERT_RULES = ROOT / "alerts" / "rules.yml"  # the condition series come first in each group


def test_both_dashboards_are_committed():
    assert [path.name for path in DASHBOARD_FILES] == ["ugro-cluster.json", "ugro-training.json"]
    assert {load(path)["uid"] for path in DASHBOARD_FILES} == {"ugro-cluster", "ugro-training"}


def test_the_committed_json_is_what_the_code_generates():
    check = subprocess.run(
        [sys.executable, "-m", "ugro.grafana", "check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    generated = grafana_cli.render()
    assert sorted(generated) == [path.name for path in DASHBOARD_FILES]
    for path in DASHBOARD_FILES:
        assert path.read_text() == generated[path.name]


def test_check_names_a_hand_edited_dashboard_and_fails(tmp_path, monkeypatch, capsys):
    for path in DASHBOARD_FILES:
        shutil.copy(path, tmp_path / path.name)
    edited = tmp_path / "ugro-training.json"
    edited.write_text(edited.read_text().replace('"Loss"', '"Loss (edited by hand)"'))
    monkeypatch.setattr(grafana_cli, "DASHBOARDS_DIR", tmp_path)
    assert grafana_cli.main(["check"]) == 1
    error = capsys.readouterr().err
    assert "grafana/dashboards/ugro-training.json differs" in error
    assert "ugro-cluster.json" not in error
    assert "python -m ugro.grafana build" in error


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_panel_has_an_id_a_unit_a_description_and_targets_with_refids(path):
    dashboard = load(path)
    ids = [panel["id"] for panel in dashboard["panels"]]
    ids += [inner["id"] for panel in dashboard["panels"] for inner in panel.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        where = f"{path.name}: panel {panel.get('title')!r}"
        assert isinstance(panel.get("id"), int), where
        assert panel.get("description", "").strip(), f"{where} has no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel.get("targets"), f"{where} has no query"
        ref_ids = [target.get("refId") for target in panel["targets"]]
        assert all(ref_ids), f"{where}: a target without refId"
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: refIds repeat"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            assert target["expr"].strip(), where


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_panels_fit_the_grid_without_overlapping(path):
    taken: set[tuple[int, int]] = set()
    for panel in load(path)["panels"]:
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not cells & taken, f"{panel['title']!r} overlaps another panel"
        taken |= cells


RANGE_SELECTOR = re.compile(r"\[([^\]]+)\]")


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_rate_windows_come_from_grafana(path):
    """A fixed window breaks at other scrape intervals or zoom levels; Grafana's does not."""
    for panel, target in targets(load(path)):
        for window in RANGE_SELECTOR.findall(target["expr"]):
            assert window == "$__rate_interval", f"{panel['title']!r}: [{window}]"


def test_panels_read_the_recording_rules_rather_than_recomputing_them():
    """A metric a recording rule already rates is read through the rule, so the dashboard,
    the alerts and `ugro watch` show the same number."""
    rules = [
        rule
        for group in yaml.safe_load(RECORDING_RULES.read_text())["groups"]
        for rule in group["rules"]
    ]
    rated = {
        match for rule in rules for match in re.findall(r"rate\((ugro_[a-z_]+)\[", rule["expr"])
    }
    assert "ugro_train_tokens_total" in rated  # the pattern finds what it should
    recorded = {rule["record"] for rule in rules}
    used = set()
    for path in DASHBOARD_FILES:
        for panel, target in targets(load(path)):
            for metric in rated:
                assert not re.search(rf"rate\({metric}[{{\[]", target["expr"]), (
                    f"{path.name}: {panel['title']!r} recomputes rate({metric}) "
                    "instead of reading its recording rule"
                )
            used |= {name for name in recorded if name in target["expr"]}
    assert len(used) >= 15, f"only {len(used)} recording rules used: {sorted(used)}"


# What a panel query never says itself: the catalogue (ugro.catalogue) says it once, and the
# dashboards read the series it records, so they show what the alerts fire on.
RESTATEMENTS = {
    "a throttle-reason matcher (read gpu:/job_rank:ugro_gpu_throttled:bool)": re.compile(
        r"\breason\s*(=|!=|=~|!~)"
    ),
    "increase(), which misses a counter's first event (read the condition series)": re.compile(
        r"\bincrease\s*\("
    ),
    "a comparison with a number: a threshold or a state a condition series holds": re.compile(
        r"(==|!=|>=|<=|>|<)\s*[-+]?\.?[0-9]"
    ),
}
GPU_JOIN = re.compile(r"on\s*\(gpu_uuid\)\s*group_left\s*\([^)]*\)\s*(\w+(\{[^}]*\})?)")


def _records(path) -> dict[str, str]:
    return {
        rule["record"]: rule["expr"]
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def _bare(expr: str) -> str:
    """PromQL without label matchers or whitespace: the shape of a computation."""
    return re.sub(r"\s+", "", re.sub(r"\{[^}]*\}", "", expr))


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_no_panel_restates_a_selector_a_reason_list_or_a_threshold(path):
    for panel, target in targets(load(path)):
        for what, pattern in RESTATEMENTS.items():
            assert not pattern.search(target["expr"]), (
                f"{path.name}: {panel['title']!r} {target['refId']} has {what}: {target['expr']}"
            )


def test_scrape_jobs_are_named_by_the_catalogue():
    """The dashboards' code takes the scrape-job selectors from ugro.catalogue.names, so the
    generated queries say exactly what the rules say."""
    for source in sorted((ROOT / "grafana").glob("*.py")):
        for job in (names.RANKS_JOB, names.NODES_JOB):
            assert f'"{job}"' not in source.read_text(), f"grafana/{source.name} selects {job}"
    for path in DASHBOARD_FILES:
        for panel, target in targets(load(path)):
            for matcher in re.findall(r'\bjob\s*(?:=|!=|=~|!~)\s*"[^"]*"', target["expr"]):
                assert matcher in (names.RANKS, names.NODES), (
                    f"{path.name}: {panel['title']!r} selects {matcher}"
                )


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_panels_read_recorded_series_rather_than_restating_their_expressions(path):
    """A ratio, a per-rank GPU reading or a condition the rules record is read by its name: a
    panel that computes it again drifts from the alerts when either changes."""
    records = {**_records(RECORDING_RULES), **_records(ALERT_RULES)}
    # The patterns find what they should: the ratios and conditions the dashboards once restated.
    assert {"gpu:ugro_gpu_memory_used:ratio", "gpu:ugro_gpu_lost:condition"} <= set(records)
    for panel, target in targets(load(path)):
        bare = _bare(target["expr"])
        for name, expr in records.items():
            restated = rf"(?<![\w:]){re.escape(_bare(expr))}(?![\w:])"
            assert not re.search(restated, bare), (
                f"{path.name}: {panel['title']!r} {target['refId']} computes {name} again "
                f"instead of reading it: {target['expr']}"
            )


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_gpu_readings_are_joined_to_ranks_as_the_recording_rules_join_them(path):
    for panel, target in targets(load(path)):
        for match in GPU_JOIN.finditer(target["expr"]):
            assert match.group(1) == RANK_GPUS, (
                f"{path.name}: {panel['title']!r} joins GPUs to ranks on {match.group(1)}, "
                f"not ugro.catalogue.promql.on_rank_gpus's {RANK_GPUS}"
            )


def test_the_datasource_variable_defaults_to_the_provisioned_prometheus():
    provisioned = yaml.safe_load(PROVISIONED_DATASOURCES.read_text())["datasources"]
    prometheus_uids = [d["uid"] for d in provisioned if d["type"] == "prometheus"]
    assert prometheus_uids == ["ugro-prometheus"]
    for path in DASHBOARD_FILES:
        variable = variables(load(path))["datasource"]
        assert variable["type"] == "datasource" and variable["query"] == "prometheus"
        assert variable["current"]["value"] == "ugro-prometheus"


def test_the_variables_each_dashboard_offers():
    by_uid = {load(path)["uid"]: variables(load(path)) for path in DASHBOARD_FILES}
    assert list(by_uid["ugro-training"]) == ["datasource", "job_id", "node", "rank"]
    assert list(by_uid["ugro-cluster"]) == ["datasource", "node"]
    training = by_uid["ugro-training"]
    assert training["job_id"]["multi"] is False
    assert training["node"]["multi"] and training["node"]["allValue"] == ".*"
    assert training["rank"]["query"]["query"] == (
        'label_values(ugro_train_rank_info{job_id="$job_id", node=~"$node"}, rank)'
    )


def test_the_training_dashboard_marks_the_jobs_alerts_on_the_time_axis():
    dashboard = load(ROOT / "grafana" / "dashboards" / "ugro-training.json")
    [annotation] = dashboard["annotations"]["list"]
    assert annotation["expr"] == 'ALERTS{alertstate="firing", job_id="$job_id"}'
    assert annotation["titleFormat"] == "{{alertname}}"
    assert annotation["enable"] is True


def test_the_training_dashboard_has_the_rows_users_look_for():
    dashboard = load(ROOT / "grafana" / "dashboards" / "ugro-training.json")
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == [
        "Overview",
        "Training",
        "Where the time went",
        "GPUs of the job",
        "Efficiency",
        "Alerts",
    ]
    titles = {panel["title"] for panel in panels(dashboard)}
    assert {
        "World size",
        "Step",
        "Tokens/s",
        "Mean loss (5m)",
        "Elapsed",
        "Alerts firing",
        "Loss",
        "Gradient norm",
        "Learning rate",
        "Throughput per rank",
        "Step time",
        "Straggler score",
        "Where the time went",
        "Phase per rank",
        "Goodput (5m)",
        "Checkpoints",
        "Last checkpoint",
        "Last checkpoint took",
        "GPU utilisation",
        "GPU memory",
        "GPU temperature",
        "GPU power",
        "GPU throttling",
        "MFU",
        "SM active",
        "Tensor pipes active",
        "DRAM bandwidth active",
        "NVLink and PCIe",
        "Firing alerts",
    } <= titles


def test_the_phase_panels_know_every_phase():
    """The per-rank phase timeline names each phase code its query can produce, and the
    time-went panel reads the job's phase shares, whose phases come from ugro.common.phases."""
    from ugro.common.phases import PHASES

    dashboard = load(ROOT / "grafana" / "dashboards" / "ugro-training.json")
    [timeline] = [panel for panel in panels(dashboard) if panel["title"] == "Phase per rank"]
    [mapping] = timeline["fieldConfig"]["defaults"]["mappings"]
    assert {code: m["text"] for code, m in mapping["options"].items()} == {
        str(code): phase for code, phase in enumerate(PHASES)
    }
    expr = timeline["targets"][0]["expr"]
    assert recording.PHASE_INDEX in expr
    [rule] = [r for r in recording.PHASE_RULES.rules if r.name == recording.PHASE_INDEX]
    missing = [p for c, p in enumerate(PHASES) if f'phase="{p}"}} + {c}' not in rule.expr]
    assert missing == []
