"""The alerting configuration, checked with the real tools: promtool, amtool and ugro.alerts.

* Prometheus's config and both rule files pass ``promtool check``; every promtool unit-test file
  under alerts/tests/ and prometheus/tests/ passes ``promtool test rules``.
* Coverage: every alert (each name and severity) has a firing case with exact labels and
  annotations and a quiet case, and every recording rule has an expression test, so a new rule
  without tests fails here.
* Alertmanager's config passes ``amtool check-config``, routes each severity to its receiver,
  and its inhibit rules name real alerts and labels those alerts carry. Inhibitions take
  effect only in a running Alertmanager: tests/alerts/test_end_to_end.py.
* alerts/rules.yml is up to date with thresholds.yml, and a bad thresholds file gives an error
  naming the file and the field.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from ugro.alerts import __main__ as alerts_cli
from ugro.alerts.rules_file import render
from ugro.catalogue.conditions import CHECKPOINT_OVERDUE, STRAGGLER
from ugro.catalogue.thresholds import THRESHOLDS_FILE, ThresholdsError, load_thresholds

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
RECORDING_RULES = ROOT / "prometheus" / "rules" / "recording.yml"
ALERT_RULES = ROOT / "alerts" / "rules.yml"
ALERTMANAGER_CONFIG = ROOT / "alerts" / "alertmanager.yml"
ALERT_TESTS = sorted((ROOT / "alerts" / "tests").glob("*.test.yml"))
RECORDING_TESTS = sorted((ROOT / "prometheus" / "tests").glob("*.test.yml"))
# Which Alertmanager receiver each severity reaches (alerts/alertmanager.yml); an alert
# without a severity falls through to the route's default.
RECEIVERS = {"critical": "slack-and-email", "warning": "slack", "info": "quiet"}
DEFAULT_RECEIVER = "slack"


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: run `make setup` (Debian package {package})")
    return path


@pytest.fixture(scope="session")
def promtool_path() -> str:
    return _binary("promtool", "prometheus")


@pytest.fixture(scope="session")
def amtool_path() -> str:
    return _binary("amtool", "prometheus-alertmanager")


def run(argv: list[str], cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def shown(result: subprocess.CompletedProcess[str]) -> str:
    """The command, its exit code and its output, for an assertion message."""
    return (
        f"$ {' '.join(map(str, result.args))}\nexit code {result.returncode}\n"
        f"{result.stdout}{result.stderr}"
    )


def load(path: pathlib.Path) -> Any:
    return yaml.safe_load(path.read_text())


def relative(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


# -- Prometheus: configuration, rule files, promtool unit tests ---------------------------------


def test_prometheus_config_is_valid_and_finds_its_rule_files(promtool_path: str) -> None:
    # The file_sd target files are written by ugro-launch at run time; promtool only warns.
    result = run([promtool_path, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, shown(result)
    rule_files = load(PROMETHEUS_CONFIG)["rule_files"]
    resolved = {(PROMETHEUS_CONFIG.parent / name).resolve() for name in rule_files}
    assert resolved == {RECORDING_RULES, ALERT_RULES}
    assert f"SUCCESS: {len(rule_files)} rule files found" in result.stdout, shown(result)


def test_rule_files_are_valid(promtool_path: str) -> None:
    result = run(
        [
            promtool_path,
            "check",
            "rules",
            "--lint=all",
            "--lint-fatal",
            str(RECORDING_RULES),
            str(ALERT_RULES),
        ]
    )
    assert result.returncode == 0, shown(result)


@pytest.mark.parametrize("test_file", [*ALERT_TESTS, *RECORDING_TESTS], ids=relative)
def test_promtool_unit_tests_pass(promtool_path: str, test_file: pathlib.Path) -> None:
    result = run([promtool_path, "test", "rules", str(test_file)])
    assert result.returncode == 0, shown(result)


# -- Coverage: a rule without tests fails here --------------------------------------------------


@dataclass(frozen=True)
class AlertCase:
    """One ``alert_rule_test`` entry of a promtool test file."""

    file: pathlib.Path
    alertname: str
    eval_time: str
    expected: list[dict[str, Any]]  # exp_alerts


def rule_groups(path: pathlib.Path) -> list[dict[str, Any]]:
    return load(path)["groups"]


def alert_rules() -> list[dict[str, Any]]:
    """The alerting rules of the alert rule file (its groups also hold the conditions)."""
    return [
        rule for group in rule_groups(ALERT_RULES) for rule in group["rules"] if "alert" in rule
    ]


def condition_rules() -> list[dict[str, Any]]:
    return [
        rule for group in rule_groups(ALERT_RULES) for rule in group["rules"] if "record" in rule
    ]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups(RECORDING_RULES) for rule in group["rules"]]


def unit_test_groups(path: pathlib.Path) -> list[dict[str, Any]]:
    return load(path).get("tests", [])


def alert_cases() -> list[AlertCase]:
    return [
        AlertCase(path, case["alertname"], str(case["eval_time"]), case.get("exp_alerts") or [])
        for path in ALERT_TESTS
        for group in unit_test_groups(path)
        for case in group.get("alert_rule_test", [])
    ]


def test_every_test_file_loads_the_rules_and_orders_their_groups() -> None:
    """A missing rule file is only a warning to promtool, and then `exp_alerts: []` passes
    vacuously; without group_eval_order promtool evaluates groups in a random order."""
    for path in [*ALERT_TESTS, *RECORDING_TESTS]:
        content = load(path)
        rule_files = {(path.parent / name).resolve() for name in content["rule_files"]}
        in_alerts = path.is_relative_to(ROOT / "alerts")
        expected = {RECORDING_RULES, ALERT_RULES} if in_alerts else {RECORDING_RULES}
        assert rule_files == expected, relative(path)
        groups = [group["name"] for rule_file in rule_files for group in rule_groups(rule_file)]
        assert sorted(content["group_eval_order"]) == sorted(groups), relative(path)


def test_every_alert_fires_in_a_test_with_exact_labels_and_annotations() -> None:
    rules = {(rule["alert"], rule["labels"]["severity"]): rule for rule in alert_rules()}
    assert len(rules) == len(alert_rules()), "an alert name appears twice with one severity"
    fired: set[tuple[str, str]] = set()
    for case in alert_cases():
        for alert in case.expected:
            labels, annotations = alert.get("exp_labels") or {}, alert.get("exp_annotations")
            where = f"{relative(case.file)}: {case.alertname} at {case.eval_time}"
            assert "severity" in labels, f"{where}: exp_labels without severity"
            rule = rules.get((case.alertname, labels["severity"]))
            assert rule is not None, f"{where}: no such alert with severity {labels['severity']}"
            assert annotations is not None, f"{where}: no exp_annotations"
            assert set(annotations) == set(rule["annotations"]), where
            fired.add((case.alertname, labels["severity"]))
    assert sorted(set(rules) - fired) == [], "alerts without a firing test case"


def test_every_alert_has_a_case_where_it_does_not_fire() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    tested = {case.alertname for case in alert_cases()}
    assert sorted(tested - names) == [], "test cases for alerts that do not exist"
    quiet = {case.alertname for case in alert_cases() if not case.expected}
    assert sorted(names - quiet) == [], "alerts without an `exp_alerts: []` case"


def test_every_recording_rule_has_an_expression_test() -> None:
    exprs = [
        case["expr"]
        for path in RECORDING_TESTS
        for group in unit_test_groups(path)
        for case in group.get("promql_expr_test", [])
    ]
    untested = [
        rule["record"]
        for rule in recording_rules()
        if not any(re.search(rf"(?<![\w:]){re.escape(rule['record'])}(?![\w:])", e) for e in exprs)
    ]
    assert untested == [], "recording rules without a promql_expr_test"


# -- Alertmanager: configuration, routes, inhibitions -------------------------------------------


@pytest.fixture(scope="module")
def alertmanager_config(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The config with its templates, beside dummy secret files (alerts/secrets/ is not
    committed), so that the check does not depend on what a checkout holds there."""
    folder = tmp_path_factory.mktemp("alerts")
    shutil.copy(ALERTMANAGER_CONFIG, folder / ALERTMANAGER_CONFIG.name)
    shutil.copytree(ALERTMANAGER_CONFIG.parent / "templates", folder / "templates")
    (folder / "secrets").mkdir()
    (folder / "secrets" / "slack_webhook_url").write_text("https://hooks.slack.invalid/T0/B0/x\n")
    (folder / "secrets" / "smtp_password").write_text("not-a-password\n")
    return folder / ALERTMANAGER_CONFIG.name


def test_alertmanager_config_is_valid(amtool_path: str, alertmanager_config: pathlib.Path) -> None:
    result = run([amtool_path, "check-config", str(alertmanager_config)])
    assert result.returncode == 0, shown(result)
    templates = len(list((ALERTMANAGER_CONFIG.parent / "templates").glob("*.tmpl")))
    assert f"- {templates} templates" in result.stdout, shown(result)


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        *(([f"severity={severity}"], receiver) for severity, receiver in RECEIVERS.items()),
        (["alertname=TrainingRanksDown", "severity=critical", "job_id=llm-7b"], "slack-and-email"),
        (["alertname=NodeDiskAlmostFull", "severity=warning", "node=node-a"], "slack"),
        (["alertname=SomethingWithoutSeverity", "node=node-a"], DEFAULT_RECEIVER),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_alerts_route_to_the_receiver_for_their_severity(
    amtool_path: str, alertmanager_config: pathlib.Path, labels: list[str], receiver: str
) -> None:
    result = run(
        [amtool_path, "config", "routes", "test", f"--config.file={alertmanager_config}", *labels]
    )
    assert result.returncode == 0, shown(result)
    assert result.stdout.strip() == receiver, shown(result)


def test_every_severity_in_the_rules_has_a_receiver() -> None:
    severities = {rule["labels"]["severity"] for rule in alert_rules()}
    assert severities <= set(RECEIVERS)


_MATCHER = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"?(.*?)"?\s*$')


def matches(matcher: str, labels: Mapping[str, str]) -> bool:
    """Alertmanager's matcher semantics: regexes are anchored, a missing label is ""."""
    parsed = _MATCHER.match(matcher)
    assert parsed is not None, f"cannot parse matcher {matcher!r}"
    name, operator, value = parsed.groups()
    actual = labels.get(name, "")
    if operator in ("=", "!="):
        return (actual == value) == (operator == "=")
    return (re.fullmatch(value, actual) is not None) == (operator == "=~")


def selected(matchers: list[str], alerts: list[dict[str, str]]) -> list[dict[str, str]]:
    return [alert for alert in alerts if all(matches(m, alert) for m in matchers)]


def inhibited(
    rules: list[dict[str, Any]], source: Mapping[str, str], target: Mapping[str, str]
) -> bool:
    """Whether a firing `source` silences `target` under Alertmanager's inhibit rules."""
    return any(
        all(matches(m, source) for m in rule["source_matchers"])
        and all(matches(m, target) for m in rule["target_matchers"])
        and all(source.get(label, "") == target.get(label, "") for label in rule["equal"])
        for rule in rules
    )


def could_pair(equal: list[str], source: Mapping[str, str], target: Mapping[str, str]) -> bool:
    """Whether some instances of these two alerts can agree on every `equal` label: the same
    alertname where that is one of them, and for the others both carry the label (a label only
    one side carries is "" on the other, so never equal)."""
    return all(
        source[label] == target[label]
        if label == "alertname"
        else (label in source) == (label in target)
        for label in equal
    )


def fired_alerts() -> list[dict[str, str]]:
    """The label sets of every firing alert the promtool tests expect: what the rules really
    produce (promtool checks them exactly), alertname included."""
    return [
        {"alertname": case.alertname, **alert["exp_labels"]}
        for case in alert_cases()
        for alert in case.expected
    ]


def example(alertname: str, severity: str | None = None, **labels: str) -> dict[str, str]:
    """The labels of the first firing `alertname` in the tests, with some values replaced."""
    for alert in fired_alerts():
        if alert["alertname"] == alertname and severity in (None, alert["severity"]):
            return {**alert, **labels}
    raise AssertionError(f"no firing {alertname} {severity or ''} in the promtool tests")


@pytest.fixture(scope="module")
def inhibit_rules() -> list[dict[str, Any]]:
    return load(ALERTMANAGER_CONFIG)["inhibit_rules"]


def test_inhibit_rules_name_real_alerts(inhibit_rules: list[dict[str, Any]]) -> None:
    alerts = fired_alerts()
    names = {alert["alertname"] for alert in alerts}
    for rule in inhibit_rules:
        for side in ("source_matchers", "target_matchers"):
            assert selected(rule[side], alerts), f"{side} {rule[side]} match no alert"
            # Every alternative of an alertname regex names an alert (no typo hides in a |).
            for matcher in rule[side]:
                parsed = _MATCHER.match(matcher)
                if parsed and parsed.group(1) == "alertname" and parsed.group(2) == "=~":
                    for alternative in parsed.group(3).split("|"):
                        assert any(re.fullmatch(alternative, n) for n in names), alternative


def test_inhibit_rules_equal_labels_are_carried_by_the_alerts(
    inhibit_rules: list[dict[str, Any]],
) -> None:
    alerts = fired_alerts()
    for rule in inhibit_rules:
        sources = selected(rule["source_matchers"], alerts)
        targets = selected(rule["target_matchers"], alerts)
        for label in rule["equal"]:
            assert any(label in s for s in sources), f"no source of {rule} carries {label}"
            assert any(label in t for t in targets), f"no target of {rule} carries {label}"


def test_inhibit_rules_reach_the_intended_targets(inhibit_rules: list[dict[str, Any]]) -> None:
    """List, per rule, the targets that no source can ever silence, and check that is meant."""
    alerts = fired_alerts()
    out_of_reach = []
    for rule in inhibit_rules:
        sources = selected(rule["source_matchers"], alerts)
        targets = selected(rule["target_matchers"], alerts)
        reachable = {
            t["alertname"] for t in targets if any(could_pair(rule["equal"], s, t) for s in sources)
        }
        out_of_reach.append(sorted({t["alertname"] for t in targets} - reachable))
    # A down node does not silence job-level alerts (no node label): a job killed by a dead
    # node must still page. A critical silences only the warning of the same name.
    warnings = {rule["alert"] for rule in alert_rules() if rule["labels"]["severity"] == "warning"}
    paired = {"GpuTemperatureHigh", "NodeDiskAlmostFull"}
    assert out_of_reach == [
        ["TrainingRanksDown", "TrainingThroughputDrop"],
        [],
        [],
        sorted(warnings - paired),
    ]


def test_a_down_node_silences_its_own_gpu_rank_and_collector_alerts_only(
    inhibit_rules: list[dict[str, Any]],
) -> None:
    node_down = example("NodeExporterDown", node="node-a")
    for target in ("GpuLost", "GpuTemperatureHigh", "TrainingStalled", "NodeCollectorDown"):
        assert inhibited(inhibit_rules, node_down, example(target, node="node-a")), target
        assert not inhibited(inhibit_rules, node_down, example(target, node="node-b")), target
    disk = example("NodeDiskAlmostFull", "warning", node="node-a")
    assert not inhibited(inhibit_rules, node_down, disk)


def test_a_crashed_job_silences_its_own_follow_on_alerts_only(
    inhibit_rules: list[dict[str, Any]],
) -> None:
    crashed = example("TrainingRanksDown", job_id="llm-7b")
    for target in ("TrainingStalled", "TrainingStragglerRank", "TrainingThroughputDrop"):
        assert inhibited(inhibit_rules, crashed, example(target, job_id="llm-7b")), target
        assert not inhibited(inhibit_rules, crashed, example(target, job_id="bert-ft")), target
    nonfinite = example("TrainingNonFiniteValues", job_id="llm-7b")
    assert not inhibited(inhibit_rules, crashed, nonfinite)


def test_a_hung_rank_silences_its_own_jobs_stall_alerts_only(
    inhibit_rules: list[dict[str, Any]],
) -> None:
    """One page names the rank a stalled job waits for; the other ranks' stall alerts, which
    say nothing more, are silenced. Another job's stall still pages."""
    hung = example("TrainingHungRank", job_id="llm-7b")
    for rank, node in (("0", "node-a"), ("1", "node-b")):
        stalled = example("TrainingStalled", job_id="llm-7b", rank=rank, node=node)
        assert inhibited(inhibit_rules, hung, stalled)
    assert not inhibited(inhibit_rules, hung, example("TrainingStalled", job_id="bert-ft"))
    assert not inhibited(inhibit_rules, example("TrainingStalled", job_id="llm-7b"), hung)
    # A crashed job's hung-rank alert would only repeat the crash.
    crashed = example("TrainingRanksDown", job_id="llm-7b")
    assert inhibited(inhibit_rules, crashed, hung)


@pytest.mark.parametrize("alertname", ["GpuTemperatureHigh", "NodeDiskAlmostFull"])
def test_a_critical_silences_its_own_warning_only(
    inhibit_rules: list[dict[str, Any]], alertname: str
) -> None:
    critical = example(alertname, "critical")
    same_thing = {**critical, "severity": "warning"}
    assert inhibited(inhibit_rules, critical, same_thing)
    assert not inhibited(inhibit_rules, critical, {**same_thing, "node": "node-z"})
    assert not inhibited(inhibit_rules, same_thing, critical)


def test_the_warning_and_critical_of_an_alert_carry_the_same_labels() -> None:
    severities: dict[str, set[str]] = {}
    for rule in alert_rules():
        severities.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    pairs = sorted(name for name, found in severities.items() if {"warning", "critical"} <= found)
    assert pairs == ["GpuTemperatureHigh", "NodeDiskAlmostFull"]
    for name in pairs:
        critical, warning = example(name, "critical"), example(name, "warning")
        assert set(critical) == set(warning), f"{name}: its two severities carry other labels"


# -- ugro.alerts: generated rules and thresholds ------------------------------------------------


def test_rules_yml_is_up_to_date() -> None:
    result = run([sys.executable, "-m", "ugro.alerts", "check"])
    assert result.returncode == 0, shown(result)


def rule_named(text: str, name: str) -> dict[str, Any]:
    """The alert, or the condition (recording rule), called ``name``."""
    for group in yaml.safe_load(text)["groups"]:
        for rule in group["rules"]:
            if name in (rule.get("alert"), rule.get("record")):
                return rule
    raise AssertionError(f"{name} not in the rendered rules")


def test_a_threshold_override_changes_the_rendered_rule() -> None:
    default = render()
    condition = rule_named(default, STRAGGLER)
    # The first line compares with the threshold; the second keeps young ranks out.
    assert condition["expr"].splitlines()[0] == "job_rank:ugro_train_straggler_score:ratio < 0.8"
    alert = rule_named(default, "TrainingStragglerRank")
    assert alert["expr"] == STRAGGLER  # the alert is its condition, held for `for:`
    assert alert["for"] == "5m"
    changed = render(**{"training.straggler_ratio": 0.5, "training.straggler_for": "1m"})
    assert rule_named(changed, STRAGGLER)["expr"].splitlines()[0] == (
        "job_rank:ugro_train_straggler_score:ratio < 0.5"
    )
    changed_alert = rule_named(changed, "TrainingStragglerRank")
    assert changed_alert["for"] == "1m"
    assert "(below 0.5)" in changed_alert["annotations"]["description"]


def test_every_alert_is_a_condition_held_for_a_while() -> None:
    """No alert restates a PromQL condition: each expression is one condition series (or a
    recorded state), which the console and the dashboards read too."""
    recorded = {rule["record"] for rule in recording_rules()} | {
        rule["record"] for rule in condition_rules()
    }
    for rule in alert_rules():
        assert rule["expr"] in recorded, f"{rule['alert']}: {rule['expr']!r} is not a series"
    conditions = [rule["expr"] for rule in condition_rules()]
    assert len(conditions) == len(set(conditions)), "a condition is written twice"


CHECKPOINT_OVERRIDES = {
    "training.checkpoint_max_age_seconds": 600,
    "training.checkpoint_overdue_for": "1m",
}
OVERRIDE_TESTS = ROOT / "alerts" / "tests" / "overrides"


def test_the_checkpoint_alert_is_off_unless_a_maximum_age_is_set() -> None:
    default = yaml.safe_load(render())
    names = {r.get("alert") or r.get("record") for g in default["groups"] for r in g["rules"]}
    assert "TrainingCheckpointOverdue" not in names
    assert CHECKPOINT_OVERDUE not in names
    changed = render(**CHECKPOINT_OVERRIDES)
    condition = rule_named(changed, CHECKPOINT_OVERDUE)
    assert "> 600" in condition["expr"]
    alert = rule_named(changed, "TrainingCheckpointOverdue")
    assert (alert["expr"], alert["for"]) == (CHECKPOINT_OVERDUE, "1m")
    assert alert["labels"] == {"severity": "warning"}
    assert "(limit 600 s)" in alert["annotations"]["description"]


def test_the_checkpoint_alert_passes_its_promtool_cases_when_on(
    promtool_path: str, tmp_path: pathlib.Path
) -> None:
    """alerts/tests/overrides/ holds cases for rules rendered with overrides: beside them, the
    recording rules and the alert rules as those overrides make them."""
    test_file = OVERRIDE_TESTS / "checkpoint_overdue.test.yml"
    shutil.copy(test_file, tmp_path / test_file.name)
    shutil.copy(RECORDING_RULES, tmp_path / "recording.yml")
    (tmp_path / "rules.yml").write_text(render(**CHECKPOINT_OVERRIDES))
    content = load(test_file)
    assert content["rule_files"] == ["recording.yml", "rules.yml"]
    groups = [g["name"] for path in (RECORDING_RULES, ALERT_RULES) for g in rule_groups(path)]
    assert sorted(content["group_eval_order"]) == sorted(groups)
    cases = [c for group in content["tests"] for c in group["alert_rule_test"]]
    assert {c["alertname"] for c in cases} == {"TrainingCheckpointOverdue"}
    assert any(not c["exp_alerts"] for c in cases) and any(c["exp_alerts"] for c in cases)
    result = run([promtool_path, "test", "rules", test_file.name], cwd=tmp_path)
    assert result.returncode == 0, shown(result)


def test_the_hung_rank_alert_waits_as_long_as_the_stall_alert_unless_told() -> None:
    default = render(**{"training.stall_for": "3m"})
    assert rule_named(default, "TrainingHungRank")["for"] == "3m"
    own = render(**{"training.stall_for": "3m", "training.hung_rank_for": "30s"})
    assert rule_named(own, "TrainingHungRank")["for"] == "30s"
    assert rule_named(own, "TrainingStalled")["for"] == "3m"


def test_every_alert_has_a_runbook_section() -> None:
    runbook = (ROOT / "alerts" / "runbook.md").read_text()
    sections = set(re.findall(r"^### (\w+)$", runbook, re.MULTILINE))
    rendered = yaml.safe_load(render(**CHECKPOINT_OVERRIDES))  # every alert generated
    names = {r["alert"] for g in rendered["groups"] for r in g["rules"] if "alert" in r}
    assert sorted(names - sections) == []


def test_an_unknown_override_is_refused() -> None:
    with pytest.raises(ThresholdsError, match=r"training\.straggler_ratoi"):
        render(**{"training.straggler_ratoi": 0.5})


def test_an_override_is_checked_like_the_file() -> None:
    with pytest.raises(ThresholdsError, match=r"training\.straggler_ratio: expected a ratio"):
        render(**{"training.straggler_ratio": 1.5})
    with pytest.raises(ThresholdsError, match=r"training\.nonfinite_window: expected a Prom"):
        render(**{"training.nonfinite_window": "0"})


Edit = Callable[[dict[str, Any]], object]
WriteThresholds = Callable[[Edit], pathlib.Path]


@pytest.fixture
def thresholds_file(tmp_path: pathlib.Path) -> WriteThresholds:
    """Writes a copy of thresholds.yml with one edit and returns its path."""

    def write(edit: Edit) -> pathlib.Path:
        data = load(THRESHOLDS_FILE)
        edit(data)
        path = tmp_path / "thresholds.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def _set(section: str, field: str, value: object) -> Edit:
    return lambda data: data[section].__setitem__(field, value)


def _top(field: str, value: object) -> Edit:
    return lambda data: data.__setitem__(field, value)


def _rename(section: str, field: str, new_name: str) -> Edit:
    return lambda data: data[section].__setitem__(new_name, data[section].pop(field))


BAD_RUNBOOK_URLS = [
    'https://wiki.example.org/runbook"}}',
    "https://wiki.example.org/{{ $labels.job_id }}",
    "https://wiki.example.org/run book",
    "https://wiki.example.org\\runbook",
    "https://wiki.example.org/runbook#alerts",
    "ftp://files.example.org/runbook",
    "javascript:alert(1)",
    "",
    42,
]


@pytest.mark.parametrize(
    ("edit", "field", "detail"),
    [
        (_set("training", "straggler_for", "5 minutes"), "training.straggler_for", "duration"),
        (_set("training", "stall_for", 60), "training.stall_for", "duration"),
        (_set("training", "nonfinite_window", "0"), "training.nonfinite_window", "duration"),
        (_set("training", "straggler_ratio", 1.5), "training.straggler_ratio", "0..1"),
        (_set("node", "disk_free_warning_ratio", 10), "node.disk_free_warning_ratio", "0..1"),
        (_set("gpu", "temperature_warning_celsius", -1), "gpu.temperature_warning_celsius", ">= 0"),
        (_set("node", "disk_fill_hours", "four"), "node.disk_fill_hours", ">= 0"),
        (_set("gpu", "memory_full_ratio", True), "gpu.memory_full_ratio", ">= 0"),
        (lambda data: data.__setitem__("network", {"rx_errors": 1}), "network", "unknown section"),
        (lambda data: data.pop("gpu"), "gpu", "expected a mapping"),
        (lambda data: data.pop("runbook_base_url"), "runbook_base_url", "http(s) URL"),
        # A misspelled field loaded, then failed with a KeyError in `check`; a missing one too.
        (
            _rename("training", "straggler_ratio", "straggler_ratoi"),
            "training",
            "unknown field(s) straggler_ratoi (did you mean straggler_ratio?); known fields: "
            "nonfinite_for, nonfinite_window, loss_spike_factor",
        ),
        (lambda data: data["gpu"].pop("lost_for"), "gpu", "missing field(s) lost_for"),
        # Only a few fields may be null (a default taken from another, or a feature off).
        (_set("training", "not_started_for", None), "training.not_started_for", "duration"),
        (_set("training", "stall_min_seconds", None), "training.stall_min_seconds", ">= 0"),
        (_set("training", "hung_rank_for", "soon"), "training.hung_rank_for", "duration"),
        (
            _set("training", "checkpoint_max_age_seconds", -1),
            "training.checkpoint_max_age_seconds",
            ">= 0",
        ),
        # `> nan` and `> inf` pass promtool and never fire.
        (_set("training", "loss_ceiling", float("nan")), "training.loss_ceiling", "finite"),
        (
            _set("gpu", "temperature_critical_celsius", float("inf")),
            "gpu.temperature_critical_celsius",
            "expected a finite number >= 0, got inf",
        ),
        (_set("node", "disk_fill_hours", 10**400), "node.disk_fill_hours", "finite"),
        # Each of these makes rules that promtool rejects, or a broken link.
        *(
            (_top("runbook_base_url", url), "runbook_base_url", "http(s) URL or a relative path")
            for url in BAD_RUNBOOK_URLS
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 40 else "",
)
def test_a_bad_thresholds_file_names_the_file_and_the_field(
    thresholds_file: WriteThresholds, edit: Edit, field: str, detail: str
) -> None:
    path = thresholds_file(edit)
    with pytest.raises(ThresholdsError) as raised:
        load_thresholds(path)
    message = str(raised.value)
    assert str(path) in message
    assert field in message
    assert detail in message


def test_the_cli_reports_a_bad_thresholds_file_in_one_line(
    thresholds_file: WriteThresholds, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's mistake is one actionable line and exit code 2, not a traceback."""
    path = thresholds_file(_set("training", "straggler_ratio", 1.5))
    assert alerts_cli.main(["check", "--thresholds", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert str(path) in error and "training.straggler_ratio" in error


def test_the_cli_names_a_misspelled_thresholds_field_and_the_known_ones(
    thresholds_file: WriteThresholds,
) -> None:
    """It loaded before, and `check` then failed with a KeyError traceback."""
    path = thresholds_file(_rename("gpu", "temperature_for", "temprature_for"))
    result = run([sys.executable, "-m", "ugro.alerts", "check", "--thresholds", str(path)])
    assert result.returncode == 2, shown(result)
    assert result.stdout == "" and result.stderr.count("\n") == 1, shown(result)
    assert result.stderr.startswith(
        f"ugro.alerts: {path}: gpu: unknown field(s) temprature_for (did you mean "
        "temperature_for?); known fields: temperature_warning_celsius,"
    ), shown(result)


def test_a_non_finite_override_is_refused() -> None:
    with pytest.raises(ThresholdsError, match=r"training\.loss_ceiling: expected a finite"):
        render(**{"training.loss_ceiling": float("nan")})


@pytest.mark.parametrize(
    "url",
    [
        "alerts/runbook.md",
        "https://wiki.example.org/ugro/runbook",
        "http://10.0.0.5:8080/ugro/runbook.md?format=html&lang=en",
    ],
)
def test_an_accepted_runbook_base_url_makes_rules_promtool_accepts(
    promtool_path: str, thresholds_file: WriteThresholds, tmp_path: pathlib.Path, url: str
) -> None:
    text = render(thresholds_file(_top("runbook_base_url", url)))
    rules = tmp_path / "rules.yml"
    rules.write_text(text)
    result = run([promtool_path, "check", "rules", str(rules)])
    assert result.returncode == 0, shown(result)
    stall = rule_named(text, "TrainingStalled")
    assert stall["annotations"]["runbook_url"] == f"{url}#trainingstalled"


# -- Alertmanager's secret files: checked before the first notification needs them -------------

GOOD_SECRETS = {
    "slack_webhook_url": "https://hooks.slack.invalid/T0/B0/x\n",  # trimmed by Alertmanager
    "smtp_password": "not-a-password",
}


@pytest.fixture
def deployed(tmp_path: pathlib.Path) -> Callable[[dict[str, str | None]], pathlib.Path]:
    """alertmanager.yml and its templates in a folder, with the secret files given (None:
    absent); returns the config's path."""

    def deploy(secrets: dict[str, str | None]) -> pathlib.Path:
        shutil.copy(ALERTMANAGER_CONFIG, tmp_path / ALERTMANAGER_CONFIG.name)
        shutil.copytree(ALERTMANAGER_CONFIG.parent / "templates", tmp_path / "templates")
        (tmp_path / "secrets").mkdir()
        for name, content in secrets.items():
            if content is not None:
                (tmp_path / "secrets" / name).write_text(content)
        return tmp_path / ALERTMANAGER_CONFIG.name

    return deploy


def check_secrets(
    config: pathlib.Path, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, list[str]]:
    status = alerts_cli.main(["check", "--alertmanager-config", str(config), *options])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.err.splitlines()


SLACK_FIELD = "receivers[slack].slack_configs[0].api_url_file in alertmanager.yml"
SMTP_FIELD = "global.smtp_auth_password_file in alertmanager.yml"


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        (
            {"slack_webhook_url": None, "smtp_password": None},
            [
                f"smtp_password ({SMTP_FIELD}): missing: Alertmanager starts without it, but "
                "every email fails",
                f"slack_webhook_url ({SLACK_FIELD}): missing: Alertmanager starts without it, "
                "but every Slack message fails",
            ],
        ),
        (
            {**GOOD_SECRETS, "smtp_password": "\n"},
            [f"smtp_password ({SMTP_FIELD}): empty: Alertmanager starts, but every email fails"],
        ),
        (
            {**GOOD_SECRETS, "smtp_password": "not-a-password\n"},
            [
                f"smtp_password ({SMTP_FIELD}): ends in a newline, which Alertmanager before "
                "0.27 sends as part of the password: write it with printf '%s'"
            ],
        ),
        (
            {**GOOD_SECRETS, "slack_webhook_url": "hooks.slack.com/services/T0/B0/x"},
            [f"slack_webhook_url ({SLACK_FIELD}): does not hold an http(s) URL on one line"],
        ),
    ],
    ids=["missing", "empty password", "password with a newline", "slack url without scheme"],
)
def test_check_names_each_secret_file_alertmanager_would_fail_on(
    amtool_path: str,
    deployed: Callable[[dict[str, str | None]], pathlib.Path],
    capsys: pytest.CaptureFixture[str],
    secrets: dict[str, str | None],
    expected: list[str],
) -> None:
    config = deployed(secrets)
    # What the issue found: amtool sees nothing wrong, and Alertmanager would start "ready".
    result = run([amtool_path, "check-config", str(config)])
    assert result.returncode == 0, shown(result)
    folder = config.parent / "secrets"
    status, lines = check_secrets(config, capsys, "--require-secrets")
    assert status == 1
    assert lines == [f"ugro.alerts: error: {folder}/{line}" for line in expected]
    # A development checkout has no secrets: there they are warnings, and `check` passes.
    status, lines = check_secrets(config, capsys)
    assert status == 0
    assert lines == [f"ugro.alerts: warning: {folder}/{line}" for line in expected]


def test_check_is_silent_when_every_secret_file_is_usable(
    deployed: Callable[[dict[str, str | None]], pathlib.Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = check_secrets(deployed(GOOD_SECRETS), capsys, "--require-secrets")
    assert (status, lines) == (0, [])
