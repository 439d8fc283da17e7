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
from ugro.grafana import __main__ as grafana_cli

PROVISIONED_DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "ugro.yml"
RECORDING_RULES = ROOT / "prometheus" / "rules" / "recording.yml"


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
    assert rows == ["Overview", "Training", "GPUs of the job", "Alerts"]
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
        "GPU utilisation",
        "GPU memory",
        "GPU temperature",
        "GPU power",
        "GPU throttling",
        "Firing alerts",
    } <= titles
