"""The catalogue is the one source of the names PromQL everywhere agrees on."""

from __future__ import annotations

import pathlib
import re

import yaml

from ugro.catalogue import names
from ugro.exporter.gpu import CLOCK_EVENT_REASONS

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Where a scrape-job name or a throttle reason may be written: the catalogue, the generated
# rule and dashboard files, the Prometheus config that defines the jobs, the exporter that
# produces the reasons, and documentation.
GENERATED = {
    ROOT / "alerts/rules.yml",
    ROOT / "prometheus/rules/recording.yml",
    *(ROOT / "grafana/dashboards").glob("*.json"),
}


def code_files() -> list[pathlib.Path]:
    found = []
    for folder in ("alerts", "catalogue", "console", "exporter", "grafana", "launcher", "trainer"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".yml", ".json"} and "tests" not in path.parts:
                found.append(path)
    return [p for p in found if p not in GENERATED]


def test_prometheus_defines_the_scrape_jobs_the_catalogue_names():
    config = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    jobs = {scrape["job_name"] for scrape in config["scrape_configs"]}
    assert {names.RANKS_JOB, names.NODES_JOB} <= jobs


def test_throttle_reasons_are_reasons_the_exporter_reports():
    reported = {reason for _, reason in CLOCK_EVENT_REASONS}
    assert set(names.THROTTLE_REASONS) <= reported
    assert "gpu_idle" not in names.THROTTLE_REASONS  # an idle GPU is not throttled


def test_scrape_jobs_and_throttle_reasons_are_written_only_in_the_catalogue():
    allowed = {ROOT / "catalogue/names.py", ROOT / "exporter/gpu.py"}
    literal = re.compile(
        rf"[\"']({names.RANKS_JOB}|{names.NODES_JOB}|"
        rf"{'|'.join(names.THROTTLE_REASONS)})[\"']"
    )
    offenders = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in code_files()
        if path not in allowed and path.name != "prometheus.yml"
        for match in literal.finditer(path.read_text())
    ]
    assert offenders == []


def test_every_phase_counts_in_exactly_one_goodput_category():
    from ugro.catalogue import goodput
    from ugro.common import phases

    counted = [phase for members in goodput.PHASES_OF.values() for phase in members]
    assert sorted(counted) == sorted(phases.PHASES)
    assert set(goodput.CATEGORIES) == set(goodput.PHASES_OF) | set(goodput.DERIVED)
    assert goodput.PHASES_OF[goodput.PRODUCTIVE] == phases.PRODUCTIVE
    assert goodput.category_of(phases.FORWARD) == goodput.PRODUCTIVE
    assert goodput.category_of(phases.STARTUP) == goodput.STARTUP


def test_the_progress_score_places_each_phase_where_phases_py_does():
    """The score's PromQL is generated from PROGRESS_ORDER: each phase appears once, with its
    place as the value added."""
    from ugro.catalogue.recording import PHASE_RULES
    from ugro.common.phases import PROGRESS_ORDER

    [score] = [r for r in PHASE_RULES.rules if r.name == "job_rank:ugro_train_progress:score"]
    found = {}
    for members, place in re.findall(
        r'ugro_train_phase\{phase=~"([a-z|]+)"\} \+ (\d+)', score.expr
    ):
        for phase in members.split("|"):
            assert phase not in found
            found[phase] = int(place)
    assert found == PROGRESS_ORDER
