"""ugro's alert rules, as data, with their thresholds taken from ``alerts/thresholds.yml``.

Expressions are ``string.Template`` texts: ``$training_straggler_ratio`` is the field
``straggler_ratio`` of the ``training`` section. Annotations are fixed texts with Prometheus's
own ``{{ $labels.x }}`` templating; the runbook anchor is the alert name in lower case.

Label conventions the rules rely on: rank series carry the target labels ``job_id``, ``rank``
and ``node`` (written by ugro-launch into file_sd targets); exporter series carry ``node``;
scrape jobs are ``ugro-ranks`` and ``ugro-nodes`` (prometheus/prometheus.yml).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from .thresholds import Thresholds

RANK = "Rank {{ $labels.rank }} of job {{ $labels.job_id }} on node {{ $labels.node }}"
GPU = "GPU {{ $labels.gpu }} ({{ $labels.gpu_uuid }}) on node {{ $labels.node }}"


@dataclass(frozen=True)
class Alert:
    name: str
    severity: str  # critical pages a person, warning goes to the queue, info is context
    expr: str  # a string.Template over the thresholds
    duration: str  # the thresholds key of its `for:`
    summary: str  # one fixed line
    description: str  # Prometheus template: labels and a humanized value


def new_events(counter: str, window: str) -> str:
    """Events a counter counted within ``window``, exactly; a series that appeared already
    above zero counts too (a first XID creates its series at 1; a NaN can precede the first
    scrape). ``increase()`` would extrapolate to fractions and miss both of those."""
    return (
        f"(max_over_time({counter}[{window}]) - min_over_time({counter}[{window}]) > 0)"
        f" or ({counter} > 0 unless {counter} offset {window})"
    )


TRAINING = [
    Alert(
        "TrainingNonFiniteValues",
        "critical",
        new_events("ugro_train_nonfinite_total", "$training_nonfinite_window"),
        "training.nonfinite_for",
        "A training rank produced a NaN or infinite loss or gradient norm",
        RANK + ": {{ $value | humanize }} step(s) with a non-finite {{ $labels.quantity }} "
        "in the last $training_nonfinite_window.",
    ),
    Alert(
        "TrainingLossSpike",
        "warning",
        "job_rank:ugro_train_loss:mean1m"
        " > $training_loss_spike_factor * job_rank:ugro_train_loss:mean15m",
        "training.loss_spike_for",
        "A rank's loss jumped well above its own recent level",
        RANK + ": mean loss over the last minute is {{ $value | humanize }}, more than "
        "$training_loss_spike_factor times its 15-minute mean.",
    ),
    Alert(
        "TrainingLossAboveCeiling",
        "warning",
        "job_rank:ugro_train_loss:mean5m > $training_loss_ceiling",
        "training.loss_ceiling_for",
        "A rank's loss is above the configured ceiling",
        RANK + ": mean loss over 5 minutes is {{ $value | humanize }} "
        "(ceiling $training_loss_ceiling).",
    ),
    Alert(
        "TrainingStalled",
        "critical",
        # The first step is not timed: until a second one, the mean is 0/0 and counts as 0.
        "(time() - ugro_train_last_step_timestamp_seconds) > clamp_min("
        "$training_stall_step_multiple * (job_rank:ugro_train_step_duration_seconds:mean >= 0"
        " or ugro_train_last_step_timestamp_seconds * 0), $training_stall_min_seconds)",
        "training.stall_for",
        "A training rank is up but has stopped completing steps",
        RANK + ": no step completed for {{ $value | humanizeDuration }} although the rank "
        "still answers scrapes.",
    ),
    Alert(
        "TrainingThroughputDrop",
        "warning",
        "job:ugro_train_tokens:rate1m"
        " < $training_throughput_drop_ratio * avg_over_time(job:ugro_train_tokens:rate1m[30m])",
        "training.throughput_drop_for",
        "A job's token throughput fell well below its own recent level",
        "Job {{ $labels.job_id }} processes {{ $value | humanize }} tokens/s, less than "
        "$training_throughput_drop_ratio of its 30-minute average.",
    ),
    Alert(
        "TrainingStragglerRank",
        "warning",
        "job_rank:ugro_train_straggler_score:ratio < $training_straggler_ratio",
        "training.straggler_for",
        "One rank is holding its job back",
        RANK + ": straggler score {{ $value | humanizePercentage }} of the job median "
        "(below $training_straggler_ratio); the other ranks wait for it.",
    ),
    Alert(
        "TrainingRanksDown",
        "critical",
        # Down, not "not started yet" nor "finished": see the lifecycle rules (recording.yml).
        "count by (job_id) (job_rank:ugro_train_down:bool) > 0",
        "training.ranks_down_for",
        "Ranks of a training job are down: the job crashed or was killed",
        "{{ $value | humanize }} rank(s) of job {{ $labels.job_id }} stopped answering before "
        "the job finished: "
        '{{ range $i, $rank := query (printf "job_rank:ugro_train_down:bool{job_id=\\"%s\\"}"'
        ' $labels.job_id) | sortByLabel "rank" }}{{ if $i }}, {{ end }}'
        "rank {{ $rank.Labels.rank }} on {{ $rank.Labels.node }}{{ end }}.",
    ),
    Alert(
        "TrainingGpuUtilizationLow",
        "warning",
        "job_rank:ugro_gpu_utilization:ratio < $training_gpu_utilization_low_ratio",
        "training.gpu_utilization_low_for",
        "A GPU used by a training rank is mostly idle",
        "GPU {{ $labels.gpu }} ({{ $labels.gpu_uuid }}) of rank {{ $labels.rank }} of job "
        "{{ $labels.job_id }} on node {{ $labels.node }} is busy "
        "{{ $value | humanizePercentage }} of the time.",
    ),
]

GPU_ALERTS = [
    Alert(
        "GpuTemperatureHigh",
        "warning",
        "ugro_gpu_temperature_celsius > $gpu_temperature_warning_celsius",
        "gpu.temperature_for",
        "A GPU is running hot",
        GPU + " is at {{ $value | humanize }} °C.",
    ),
    Alert(
        "GpuTemperatureHigh",
        "critical",
        "ugro_gpu_temperature_celsius > $gpu_temperature_critical_celsius",
        "gpu.temperature_for",
        "A GPU is running hot",
        GPU + " is at {{ $value | humanize }} °C.",
    ),
    Alert(
        "GpuThrottled",
        "warning",
        'ugro_gpu_clock_event_active{reason=~"sw_power_cap|hw_slowdown|sw_thermal_slowdown'
        '|hw_thermal_slowdown|hw_power_brake_slowdown"} == 1',
        "gpu.throttle_for",
        "A GPU's clocks are held down by power or heat",
        GPU + " has been throttled ({{ $labels.reason }}) continuously.",
    ),
    Alert(
        "GpuMemoryNearlyFull",
        "warning",
        "ugro_gpu_memory_used_bytes / ugro_gpu_memory_total_bytes > $gpu_memory_full_ratio",
        "gpu.memory_full_for",
        "A GPU's memory is nearly full",
        GPU + " has {{ $value | humanizePercentage }} of its memory in use.",
    ),
    Alert(
        "GpuXidError",
        "critical",
        new_events("ugro_gpu_xid_errors_total", "5m"),
        "gpu.xid_for",
        "The driver reported an XID error on a GPU",
        GPU + " reported XID {{ $labels.xid }} ({{ $value | humanize }} in 5 minutes).",
    ),
    Alert(
        "GpuEccUncorrectable",
        "critical",
        new_events('ugro_gpu_ecc_errors_total{type="uncorrected"}', "5m"),
        "gpu.ecc_uncorrectable_for",
        "A GPU had uncorrectable memory errors",
        GPU + " had {{ $value | humanize }} uncorrectable ECC error(s) in 5 minutes.",
    ),
    Alert(
        "GpuLost",
        "critical",
        "ugro_gpu_up == 0",
        "gpu.lost_for",
        "A GPU fell off the bus",
        GPU + " no longer answers NVML.",
    ),
]

NODE_ALERTS = [
    Alert(
        "NodeDiskAlmostFull",
        "warning",
        "ugro_node_filesystem_free_bytes / ugro_node_filesystem_size_bytes"
        " < $node_disk_free_warning_ratio",
        "node.disk_full_for",
        "A filesystem is almost full",
        "{{ $labels.mountpoint }} on node {{ $labels.node }} has "
        "{{ $value | humanizePercentage }} free.",
    ),
    Alert(
        "NodeDiskAlmostFull",
        "critical",
        "ugro_node_filesystem_free_bytes / ugro_node_filesystem_size_bytes"
        " < $node_disk_free_critical_ratio",
        "node.disk_full_for",
        "A filesystem is almost full",
        "{{ $labels.mountpoint }} on node {{ $labels.node }} has "
        "{{ $value | humanizePercentage }} free.",
    ),
    Alert(
        "NodeDiskFillingUp",
        "warning",
        "predict_linear(ugro_node_filesystem_free_bytes[1h], $node_disk_fill_hours * 3600) < 0"
        " and ugro_node_filesystem_free_bytes / ugro_node_filesystem_size_bytes < 0.4",
        "node.disk_fill_for",
        "A filesystem will be full within hours at its current rate",
        "{{ $labels.mountpoint }} on node {{ $labels.node }} is predicted to run out of space "
        "within $node_disk_fill_hours hours.",
    ),
    Alert(
        "NodeMemoryPressure",
        "warning",
        "ugro_node_memory_available_bytes / ugro_node_memory_total_bytes"
        " < $node_memory_available_ratio",
        "node.memory_pressure_for",
        "A node is almost out of memory",
        "Node {{ $labels.node }} has {{ $value | humanizePercentage }} of its memory available.",
    ),
    Alert(
        "NodeCpuSaturated",
        "warning",
        "node:ugro_node_cpu_utilization:ratio5m > $node_cpu_saturation_ratio",
        "node.cpu_saturation_for",
        "A node's CPUs are saturated",
        "Node {{ $labels.node }} CPUs are {{ $value | humanizePercentage }} busy.",
    ),
    Alert(
        "NodeExporterDown",
        "critical",
        'up{job="ugro-nodes"} == 0',
        "node.exporter_down_for",
        "A node's ugro-exporter does not answer: the node may be down",
        "Node {{ $labels.node }} ({{ $labels.instance }}) has not answered scrapes.",
    ),
    Alert(
        "NodeCollectorDown",
        "warning",
        "ugro_exporter_collector_up == 0"
        ' unless on(instance, collector) ugro_exporter_collector_down_reason{collector="gpu",'
        ' reason=~"library_not_found|module_missing"}',
        "node.collector_down_for",
        "A collector of a node's ugro-exporter cannot read its source",
        "The {{ $labels.collector }} collector on node {{ $labels.node }} is down.",
    ),
]

GROUPS = {"ugro-training": TRAINING, "ugro-gpu": GPU_ALERTS, "ugro-node": NODE_ALERTS}


def alert_rules(thresholds: Thresholds) -> dict[str, Any]:
    """The Prometheus rule file, as a mapping ready for YAML."""
    subs = thresholds.substitutions()
    groups = []
    for group, alerts in GROUPS.items():
        rules = []
        for alert in alerts:
            rules.append(
                {
                    "alert": alert.name,
                    "expr": string.Template(alert.expr).substitute(subs),
                    "for": thresholds[alert.duration],
                    "labels": {"severity": alert.severity},
                    "annotations": {
                        "summary": alert.summary,
                        "description": string.Template(alert.description).safe_substitute(subs),
                        "runbook_url": f"{thresholds.runbook_base_url}#{alert.name.lower()}",
                    },
                }
            )
        groups.append({"name": group, "rules": rules})
    return {"groups": groups}
