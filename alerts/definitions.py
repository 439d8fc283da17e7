"""ugro's alerts: each is a condition from the catalogue (ugro.catalogue.conditions), a
``for:`` from the thresholds, a severity and its texts. Annotations use Prometheus's own
``{{ $labels.x }}`` templating; the runbook anchor is the alert name in lower case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ugro.catalogue import conditions as c
from ugro.catalogue.rules import AlertRule, Group
from ugro.catalogue.thresholds import Thresholds

RANK = "Rank {{ $labels.rank }} of job {{ $labels.job_id }} on node {{ $labels.node }}"
GPU = "GPU {{ $labels.gpu }} ({{ $labels.gpu_uuid }}) on node {{ $labels.node }}"

# The alerting rank's current phase, read when the alert is rendered.
_PHASE_NOW = (
    '{{ with query (printf "ugro_train_phase{job_id=\\"%s\\",rank=\\"%s\\",node=\\"%s\\"}"'
    " $labels.job_id $labels.rank $labels.node) }} It is in phase "
    "{{ (index . 0).Labels.phase }}.{{ end }}"
)
# When a job's ranks have not started, the one the others wait for, if one is behind them all.
_LEAST_PROGRESSED = (
    '{{ with query (printf "' + c.LEAST_PROGRESSED + '{job_id=\\"%s\\"}" $labels.job_id) }}'
    "{{ if eq (len .) 1 }} The job's least-progressed rank is rank {{ (index . 0).Labels.rank }}"
    " on {{ (index . 0).Labels.node }}, in phase {{ (index . 0).Labels.phase }}."
    "{{ end }}{{ end }}"
)

Text = Callable[[Thresholds], str]


@dataclass(frozen=True)
class Alert:
    name: str
    severity: str  # critical pages a person, warning goes to the queue, info is context
    condition: str  # a condition series: the alert fires while it exists for `for:`
    duration: Text  # its `for:`
    summary: str  # one fixed line
    description: Text  # a Prometheus template: labels and a humanized value
    # Whether the thresholds generate it (a condition can be off until configured).
    enabled: Callable[[Thresholds], bool] = lambda t: True


TRAINING = [
    Alert(
        "TrainingNonFiniteValues",
        "critical",
        c.NONFINITE,
        lambda t: t.training.nonfinite_for,
        "A training rank produced a NaN or infinite loss or gradient norm",
        lambda t: (
            RANK + ": {{ $value | humanize }} step(s) with a non-finite "
            f"{{{{ $labels.quantity }}}} in the last {t.training.nonfinite_window}."
        ),
    ),
    Alert(
        "TrainingLossSpike",
        "warning",
        c.LOSS_SPIKE,
        lambda t: t.training.loss_spike_for,
        "A rank's loss jumped well above its own recent level",
        lambda t: (
            RANK + ": mean loss over the last minute is {{ $value | humanize }}, more "
            f"than {t.training.loss_spike_factor} times its 15-minute mean."
        ),
    ),
    Alert(
        "TrainingLossAboveCeiling",
        "warning",
        c.LOSS_ABOVE_CEILING,
        lambda t: t.training.loss_ceiling_for,
        "A rank's loss is above the configured ceiling",
        lambda t: (
            RANK + ": mean loss over 5 minutes is {{ $value | humanize }} "
            f"(ceiling {t.training.loss_ceiling})."
        ),
    ),
    Alert(
        "TrainingStalled",
        "critical",
        c.STALLED,
        lambda t: t.training.stall_for,
        "A training rank is up but has stopped completing steps",
        lambda t: (
            RANK + ": no step completed for {{ $value | humanizeDuration }} although "
            "the rank still answers scrapes. `ugro-launch stacks {{ $labels.job_id }}` shows "
            "where each rank waits."
        ),
    ),
    Alert(
        "TrainingHungRank",
        "critical",
        c.HUNG_RANK,
        lambda t: t.training.hung_rank_duration,
        "A training job is stalled, waiting for one rank",
        lambda t: (
            RANK + " is the rank its stalled job waits for: it is in phase "
            "{{ $labels.phase }} and has completed no step for {{ $value | humanizeDuration }}, "
            "while the other ranks went on to the next collective. "
            "`ugro-launch stacks {{ $labels.job_id }}` shows where it hangs."
        ),
    ),
    Alert(
        "TrainingRankNotStarted",
        "warning",
        c.NOT_STARTED,
        lambda t: t.training.not_started_for,
        "A training rank serves telemetry but has not completed its first step",
        lambda t: (
            RANK + ": no step completed {{ $value | humanizeDuration }} after its telemetry "
            f"started (limit {t.training.not_started_seconds:g} s)."
            + _PHASE_NOW
            + _LEAST_PROGRESSED
        ),
    ),
    Alert(
        "TrainingCheckpointOverdue",
        "warning",
        c.CHECKPOINT_OVERDUE,
        lambda t: t.training.checkpoint_overdue_for,
        "A training rank has not checkpointed for longer than configured",
        lambda t: (
            RANK + ": no checkpoint for {{ $value | humanizeDuration }} "
            f"(limit {t.training.checkpoint_max_age_seconds or 0:g} s); a crash now loses "
            "all of that work."
        ),
        enabled=lambda t: t.training.checkpoint_max_age_seconds is not None,
    ),
    Alert(
        "TrainingThroughputDrop",
        "warning",
        c.THROUGHPUT_DROP,
        lambda t: t.training.throughput_drop_for,
        "A job's token throughput fell well below its own recent level",
        lambda t: (
            "Job {{ $labels.job_id }} processes {{ $value | humanize }} tokens/s, less "
            f"than {t.training.throughput_drop_ratio} of its "
            f"{c.THROUGHPUT_BASELINE_WINDOW} average."
        ),
    ),
    Alert(
        "TrainingStragglerRank",
        "warning",
        c.STRAGGLER,
        lambda t: t.training.straggler_for,
        "One rank is holding its job back",
        lambda t: (
            RANK + ": straggler score {{ $value | humanizePercentage }} of the job "
            f"median (below {t.training.straggler_ratio}); the other ranks wait for it."
        ),
    ),
    Alert(
        "TrainingRanksDown",
        "critical",
        c.RANKS_DOWN,
        lambda t: t.training.ranks_down_for,
        "Ranks of a training job are down: the job crashed or was killed",
        lambda t: (
            "{{ $value | humanize }} rank(s) of job {{ $labels.job_id }} stopped "
            "answering before the job finished: "
            '{{ range $i, $rank := query (printf "job_rank:ugro_train_down:bool{job_id=\\"%s\\"}"'
            ' $labels.job_id) | sortByLabel "rank" }}{{ if $i }}, {{ end }}'
            "rank {{ $rank.Labels.rank }} on {{ $rank.Labels.node }}{{ end }}."
        ),
    ),
    Alert(
        "TrainingGpuUtilizationLow",
        "warning",
        c.GPU_UTILIZATION_LOW,
        lambda t: t.training.gpu_utilization_low_for,
        "A GPU used by a training rank is mostly idle",
        lambda t: (
            "GPU {{ $labels.gpu }} ({{ $labels.gpu_uuid }}) of rank {{ $labels.rank }} "
            "of job {{ $labels.job_id }} on node {{ $labels.node }} is busy "
            "{{ $value | humanizePercentage }} of the time."
        ),
    ),
]

TRAINING += [
    Alert(
        "TrainingTensorCoresIdle",
        "info",
        c.TENSOR_IDLE,
        lambda t: t.training.tensor_active_low_for,
        "A training rank's GPU steps without using its tensor cores",
        lambda t: (
            RANK + ": its GPU's tensor pipes were busy {{ $value | humanizePercentage }} "
            f"of the time (below {t.training.tensor_active_low_ratio}) while it kept stepping."
        ),
    ),
    Alert(
        "TrainingAllocatorRetries",
        "warning",
        c.ALLOCATOR_RETRIES,
        lambda t: t.training.allocator_retries_for,
        "A rank's CUDA memory allocator keeps running out of cached memory",
        lambda t: (
            RANK + ": {{ $value | humanize }} allocator retries in the last "
            f"{t.training.allocator_retries_window}; an out-of-memory crash often follows."
        ),
    ),
]

GPU_ALERTS = [
    Alert(
        "GpuTemperatureHigh",
        "warning",
        c.GPU_TEMPERATURE_WARNING,
        lambda t: t.gpu.temperature_for,
        "A GPU is running hot",
        lambda t: GPU + " is at {{ $value | humanize }} °C.",
    ),
    Alert(
        "GpuTemperatureHigh",
        "critical",
        c.GPU_TEMPERATURE_CRITICAL,
        lambda t: t.gpu.temperature_for,
        "A GPU is running hot",
        lambda t: GPU + " is at {{ $value | humanize }} °C.",
    ),
    Alert(
        "GpuThrottled",
        "warning",
        c.GPU_THROTTLED,
        lambda t: t.gpu.throttle_for,
        "A GPU's clocks are held down by power or heat",
        lambda t: GPU + " has been throttled ({{ $labels.reason }}) continuously.",
    ),
    Alert(
        "GpuMemoryNearlyFull",
        "warning",
        c.GPU_MEMORY_FULL,
        lambda t: t.gpu.memory_full_for,
        "A GPU's memory is nearly full",
        lambda t: GPU + " has {{ $value | humanizePercentage }} of its memory in use.",
    ),
    Alert(
        "GpuXidError",
        "critical",
        c.GPU_XID,
        lambda t: t.gpu.xid_for,
        "The driver reported an XID error on a GPU",
        lambda t: (
            GPU + " reported XID {{ $labels.xid }} ({{ $value | humanize }} in "
            f"{c.GPU_ERROR_WINDOW})."
        ),
    ),
    Alert(
        "GpuEccUncorrectable",
        "critical",
        c.GPU_ECC_UNCORRECTABLE,
        lambda t: t.gpu.ecc_uncorrectable_for,
        "A GPU had uncorrectable memory errors",
        lambda t: (
            GPU + " had {{ $value | humanize }} uncorrectable ECC error(s) in "
            f"{c.GPU_ERROR_WINDOW}."
        ),
    ),
    Alert(
        "GpuRecoveryRequested",
        "critical",
        c.GPU_RECOVERY,
        lambda t: t.gpu.recovery_for,
        "The driver asks for a GPU reset or a node reboot",
        lambda t: (
            GPU + " asks for recovery action {{ $value }} "
            "(1 GPU reset, 2 node reboot, 3 drain peer-to-peer, 4 drain and reset)."
        ),
    ),
    Alert(
        "GpuLost",
        "critical",
        c.GPU_LOST,
        lambda t: t.gpu.lost_for,
        "A GPU fell off the bus",
        lambda t: GPU + " no longer answers NVML.",
    ),
]

NODE_ALERTS = [
    Alert(
        "NodeDiskAlmostFull",
        "warning",
        c.DISK_FULL_WARNING,
        lambda t: t.node.disk_full_for,
        "A filesystem is almost full",
        lambda t: (
            "{{ $labels.mountpoint }} on node {{ $labels.node }} has "
            "{{ $value | humanizePercentage }} free."
        ),
    ),
    Alert(
        "NodeDiskAlmostFull",
        "critical",
        c.DISK_FULL_CRITICAL,
        lambda t: t.node.disk_full_for,
        "A filesystem is almost full",
        lambda t: (
            "{{ $labels.mountpoint }} on node {{ $labels.node }} has "
            "{{ $value | humanizePercentage }} free."
        ),
    ),
    Alert(
        "NodeDiskFillingUp",
        "warning",
        c.DISK_FILLING,
        lambda t: t.node.disk_fill_for,
        "A filesystem will be full within hours at its current rate",
        lambda t: (
            "{{ $labels.mountpoint }} on node {{ $labels.node }} is predicted to run "
            f"out of space within {t.node.disk_fill_hours} hours."
        ),
    ),
    Alert(
        "NodeMemoryPressure",
        "warning",
        c.MEMORY_PRESSURE,
        lambda t: t.node.memory_pressure_for,
        "A node is almost out of memory",
        lambda t: (
            "Node {{ $labels.node }} has {{ $value | humanizePercentage }} of its memory available."
        ),
    ),
    Alert(
        "NodeCpuSaturated",
        "warning",
        c.CPU_SATURATED,
        lambda t: t.node.cpu_saturation_for,
        "A node's CPUs are saturated",
        lambda t: "Node {{ $labels.node }} CPUs are {{ $value | humanizePercentage }} busy.",
    ),
    Alert(
        "NodeExporterDown",
        "critical",
        c.EXPORTER_DOWN,
        lambda t: t.node.exporter_down_for,
        "A node's ugro-exporter does not answer: the node may be down",
        lambda t: "Node {{ $labels.node }} ({{ $labels.instance }}) has not answered scrapes.",
    ),
    Alert(
        "NodeCollectorDown",
        "warning",
        c.COLLECTOR_DOWN,
        lambda t: t.node.collector_down_for,
        "A collector of a node's ugro-exporter cannot read its source",
        lambda t: "The {{ $labels.collector }} collector on node {{ $labels.node }} is down.",
    ),
]

# group -> (its conditions, its alerts): conditions first, so that an alert reads the
# condition of the same evaluation.
GROUPS = {
    "ugro-training": (c.training, TRAINING),
    "ugro-gpu": (c.gpu, GPU_ALERTS),
    "ugro-node": (c.node, NODE_ALERTS),
}


def alert_groups(thresholds: Thresholds) -> list[Group]:
    """The alert rule file's groups: each group's conditions, then its alerts."""
    groups = []
    for name, (conditions_of, alerts) in GROUPS.items():
        rules: list = list(conditions_of(thresholds))
        for alert in alerts:
            if not alert.enabled(thresholds):
                continue
            rules.append(
                AlertRule(
                    alert.name,
                    alert.condition,
                    alert.duration(thresholds),
                    {"severity": alert.severity},
                    {
                        "summary": alert.summary,
                        "description": alert.description(thresholds),
                        "runbook_url": f"{thresholds.runbook_base_url}#{alert.name.lower()}",
                    },
                )
            )
        groups.append(Group(name, rules))
    return groups
