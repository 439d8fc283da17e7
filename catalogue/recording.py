"""The measurement rules: job-, rank- and node-level numbers without thresholds.

``prometheus/rules/recording.yml`` is generated from this (``python -m ugro.alerts build``).
Names follow ``level:metric:operations``. Rank series carry the target labels job_id, rank and
node; ``by (job_id)`` aggregates a job's ranks.
"""

from __future__ import annotations

from ugro.common.phases import DATA, PHASES, PROGRESS_ORDER

from . import goodput
from .names import RANK_LABELS, RANKS, THROTTLED
from .promql import on_rank_gpus
from .rules import Group, Record

# The node health score, 0-100: points per part, and where each part starts losing them.
HEALTH_POINTS = {"gpu": 40, "memory": 20, "disk": 20, "cpu": 20}
HEALTH_MEMORY_FULL_MARKS_AVAILABLE = 0.1  # full marks from 10 % available down to 0 at 0 %
HEALTH_DISK_FULL_MARKS_FREE = 0.1  # the fullest filesystem: full marks from 10 % free
HEALTH_CPU_FULL_MARKS_BUSY = 0.9  # full marks up to 90 % busy, none at 100 %
# How long a lifecycle latch reads its own last value back: covers a restart of Prometheus.
LATCH_MEMORY = "10m"


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def _mean(metric: str, window: str, by: str = "") -> str:
    """An exact windowed mean from a summary's _sum and _count (finite values only)."""
    if by:
        return (
            f"sum by ({by}) (rate({metric}_sum[{window}]))\n"
            f"/ sum by ({by}) (rate({metric}_count[{window}]))"
        )
    return f"rate({metric}_sum[{window}]) / rate({metric}_count[{window}])"


LIFECYCLE = Group(
    "ugro-training-lifecycle",
    why="""\
Where a rank is in its life, from its target's scrapes. A rank target is registered at
launch, but a rank serves /metrics only once the user's code has built its model and
created Telemetry, which can take minutes; and a rank that finishes stops answering before
its target is removed. Neither is "down". Down means: it has answered, it did not say it
finished (Telemetry.close() serves ugro_train_end_time_seconds before the process exits),
and it no longer answers. The two latches read their own last value (LATCH_MEMORY covers a
restart of Prometheus) and last only while the rank's target exists. Order matters:
Prometheus evaluates a group's rules in turn.""",
    rules=[
        Record(
            "job_rank:ugro_train_started:latch",
            f"group by ({RANK_LABELS}) (max_over_time(up{{{RANKS}}}[1m]) == 1)\n"
            f"or (last_over_time(job_rank:ugro_train_started:latch[{LATCH_MEMORY}])\n"
            f"    and on ({RANK_LABELS}) up{{{RANKS}}})",
        ),
        Record(
            "job_rank:ugro_train_ended:latch",
            f"group by ({RANK_LABELS}) (\n"
            f"  last_over_time(ugro_train_end_time_seconds{{{RANKS}}}[1m]))\n"
            f"or (last_over_time(job_rank:ugro_train_ended:latch[{LATCH_MEMORY}])\n"
            f"    and on ({RANK_LABELS}) up{{{RANKS}}})",
            why="last_over_time: the end marker's final scrape is kept although the next, "
            "failed\nscrape marks the series stale.",
        ),
        Record(
            "job_rank:ugro_train_down:bool",
            f"group by ({RANK_LABELS}) (up{{{RANKS}}} == 0)\n"
            f"and on ({RANK_LABELS}) job_rank:ugro_train_started:latch\n"
            f"unless on ({RANK_LABELS}) job_rank:ugro_train_ended:latch",
        ),
    ],
)

RATES = Group(
    "ugro-training-rates",
    rules=[
        Record("job_rank:ugro_train_tokens:rate1m", "rate(ugro_train_tokens_total[1m])"),
        Record("job_rank:ugro_train_samples:rate1m", "rate(ugro_train_samples_total[1m])"),
        Record("job_rank:ugro_train_steps:rate1m", "rate(ugro_train_steps_total[1m])"),
        Record(
            "job:ugro_train_tokens:rate1m", "sum by (job_id) (job_rank:ugro_train_tokens:rate1m)"
        ),
        Record(
            "job:ugro_train_samples:rate1m", "sum by (job_id) (job_rank:ugro_train_samples:rate1m)"
        ),
        Record(
            "job_rank:ugro_train_loss:mean1m",
            _mean("ugro_train_loss", "1m"),
            why="Exact windowed means from _sum/_count (finite values only).",
        ),
        Record("job_rank:ugro_train_loss:mean5m", _mean("ugro_train_loss", "5m")),
        Record("job_rank:ugro_train_loss:mean15m", _mean("ugro_train_loss", "15m")),
        Record("job:ugro_train_loss:mean5m", _mean("ugro_train_loss", "5m", by="job_id")),
        Record("job_rank:ugro_train_grad_norm:mean1m", _mean("ugro_train_grad_norm", "1m")),
        Record("job_rank:ugro_train_grad_norm:mean5m", _mean("ugro_train_grad_norm", "5m")),
        Record("job:ugro_train_grad_norm:mean5m", _mean("ugro_train_grad_norm", "5m", by="job_id")),
        Record(
            "job_rank:ugro_train_step_duration_seconds:mean1m",
            _mean("ugro_train_step_duration_seconds", "1m"),
        ),
        Record(
            "job_rank:ugro_train_step_duration_seconds:p90_1m",
            "histogram_quantile(0.9, rate(ugro_train_step_duration_seconds_bucket[1m]))",
            why="The 90th percentile of each rank's step time over the last minute, from the "
            "histogram.",
        ),
        Record(
            "job_rank:ugro_train_step_duration_seconds:mean",
            "ugro_train_step_duration_seconds_sum / ugro_train_step_duration_seconds_count",
            why="Over the rank's whole life: still defined when no step completed recently, "
            "which is\nwhat the stall condition compares against.",
        ),
        Record(
            "job_rank:ugro_train_model_flops:rate1m",
            "rate(ugro_train_model_flops_total[1m])",
            why="Model FLOPs per second (the FLOPs per token or sample the loop declared, times "
            "what it\nprocessed): the numerator of MFU.",
        ),
        Record(
            "job_rank:ugro_train_mfu:ratio1m",
            "job_rank:ugro_train_model_flops:rate1m\n"
            "/ on (job_id, rank) group_left ()\n"
            "max by (job_id, rank) (ugro_train_peak_flops_per_second > 0)",
            why="Model FLOPs utilisation (the PaLM definition): achieved model FLOP/s over the "
            "device's\ndense peak for the training dtype. Absent where no peak is known (CPU, an "
            "unlisted GPU).",
        ),
        Record(
            "job:ugro_train_mfu:ratio1m",
            "sum by (job_id) (job_rank:ugro_train_model_flops:rate1m\n"
            "  and on (job_id, rank) (ugro_train_peak_flops_per_second > 0))\n"
            "/ sum by (job_id) (ugro_train_peak_flops_per_second > 0)",
            why="The job's MFU: its ranks' model FLOP/s over the sum of their peaks.",
        ),
        Record(
            "job:ugro_train_progress:ratio",
            "max by (job_id) (ugro_train_steps_total) / max by (job_id) (ugro_train_target_steps)",
        ),
    ],
)

# The progress score counts steps in units of this, and adds the place of the rank's phase
# within a step (PROGRESS_ORDER), which must stay below it.
PROGRESS_STEP_WEIGHT = 10
assert max(PROGRESS_ORDER.values()) < PROGRESS_STEP_WEIGHT
assert set(PROGRESS_ORDER) == set(PHASES)


def _phase_places() -> str:
    """Each rank's place within a step (PROGRESS_ORDER) as the value of its phase series, one
    alternative per place, generated so that the order is written only in ugro.common.phases."""
    places: dict[int, list[str]] = {}
    for phase in PHASES:
        places.setdefault(PROGRESS_ORDER[phase], []).append(phase)
    alternatives = [
        f'0 * ugro_train_phase{{phase=~"{"|".join(members)}"}} + {place}'
        for place, members in sorted(places.items())
    ]
    return "\nor ".join(alternatives)


def _phase_indexes() -> str:
    """Each rank's current phase as the value of its phase series: its index in PHASES."""
    return "\nor ".join(
        f'0 * ugro_train_phase{{phase="{phase}"}} + {index}' for index, phase in enumerate(PHASES)
    )


PHASE_INDEX = "job_rank:ugro_train_phase:index"
_PHASE_RATE = "job_rank:ugro_train_phase_seconds:rate5m"
_PRODUCTIVE = f'phase=~"{goodput.phase_regex(goodput.PRODUCTIVE)}"'
PHASE_RULES = Group(
    "ugro-training-phases",
    why="""\
Where the ranks' time goes and how far each has got. A rank is always in one phase
(ugro.common.phases); ugro_train_phase_seconds_total counts its seconds per phase, the current
one up to the scrape, so a rank's phase rates sum to 1. The goodput categories group phases as
catalogue/goodput.py defines them; stalls and restarts are taken out by `ugro report`, which
sees the whole run.""",
    rules=[
        Record(
            PHASE_INDEX,
            f"max without (phase) (\n{_indent(_phase_indexes())}\n)",
            why="Each rank's current phase as a number, its index in ugro.common.phases.PHASES: "
            "a state\ntimeline shows values, and a phase is a label. Recorded once per cycle: a "
            "panel that\nmatched every phase itself cost seconds at a thousand ranks.",
        ),
        Record(
            _PHASE_RATE,
            "rate(ugro_train_phase_seconds_total[5m])",
            why="The share of its wall time each rank spent in each phase over 5 minutes.",
        ),
        Record(
            "job_phase:ugro_train_phase_seconds:avg_rate5m",
            f"sum by (job_id, phase) ({_PHASE_RATE})\n"
            "/ on (job_id) group_left ()\n"
            f"count by (job_id) (count by ({RANK_LABELS}) ({_PHASE_RATE}))",
            why="The job's share of rank-time per phase: the mean over its ranks, a rank without "
            "a phase's\nseries counting 0 there, so that a job's phases sum to 1.",
        ),
        Record(
            "job:ugro_train_goodput:ratio_rate5m",
            f"(\n  sum by (job_id) ({_PHASE_RATE}{{{_PRODUCTIVE}}})\n"
            f"  or sum by (job_id) ({_PHASE_RATE}) * 0\n)\n"
            f"/ sum by (job_id) ({_PHASE_RATE})",
            why="The productive phases' share of the job's rank-time: 0, not absent, while no "
            "rank has\ncompleted a step yet. A hung rank's time counts in the phase it hangs in.",
        ),
        Record(
            "job_rank:ugro_train_progress:score",
            f"ugro_train_steps_total * {PROGRESS_STEP_WEIGHT}\n"
            "+ ignoring (phase) group_right ()\n"
            f"(\n{_indent(_phase_places())}\n)",
            why="""\
How far a rank has got: steps completed, then its phase's place within a step. When a job
hangs, the healthy ranks run on to the next collective and wait there; the rank they wait
for has the lowest score. Carries the rank's phase.""",
        ),
        Record(
            "job_rank:ugro_train_least_progressed:score",
            "job_rank:ugro_train_progress:score\n"
            "== on (job_id) group_left ()\n"
            "min by (job_id) (job_rank:ugro_train_progress:score)",
            why="The ranks at their job's lowest progress score (all of them while they are "
            "level).",
        ),
    ],
)

STRAGGLERS = Group(
    "ugro-training-stragglers",
    rules=[
        Record(
            "job_rank:ugro_train_busy:ratio1m",
            "clamp(1 - sum without (phase) ("
            f'rate(ugro_train_phase_seconds_total{{phase="{DATA}"}}[1m])), 0, 1)\n'
            "or (ugro_train_steps_total * 0 + 1)",
            why="""\
The share of its time a rank is not waiting for input (its data phase). Under synchronous
DDP all ranks step together, so a slow input pipeline shows as the time that rank spends
waiting; ranks that do not mark their data loading count as never waiting.""",
        ),
        Record(
            "job_rank:ugro_train_effective_tokens:rate1m",
            "job_rank:ugro_train_tokens:rate1m\n"
            "* on (job_id, rank) group_left () job_rank:ugro_train_busy:ratio1m",
        ),
        Record(
            "job_rank:ugro_train_straggler_score:ratio",
            "job_rank:ugro_train_effective_tokens:rate1m\n"
            "/ on (job_id) group_left ()\n"
            "quantile by (job_id) (0.5, job_rank:ugro_train_effective_tokens:rate1m)",
            why="1 is the job's median rank; 0.5 means half the median's effective throughput.",
        ),
    ],
)

GPUS = Group(
    # The name predates the per-GPU rules: promtool tests and dashboards know it.
    "ugro-job-gpus",
    why="""\
Per GPU, then per rank: a rank's GPU readings are joined on the GPU's UUID with the
rank's info series.""",
    rules=[
        Record(
            "gpu:ugro_gpu_memory_used:ratio",
            "ugro_gpu_memory_used_bytes / ugro_gpu_memory_total_bytes",
        ),
        Record(
            "gpu:ugro_gpu_throttled:bool",
            f"ugro_gpu_clock_event_active{{{THROTTLED}}} == 1",
            why="One series per reason that holds a GPU's clocks down by power or heat, "
            "while it does.",
        ),
        Record("job_rank:ugro_gpu_utilization:ratio", on_rank_gpus("ugro_gpu_utilization_ratio")),
        Record("job_rank:ugro_gpu_memory_used:bytes", on_rank_gpus("ugro_gpu_memory_used_bytes")),
        Record("job_rank:ugro_gpu_memory_total:bytes", on_rank_gpus("ugro_gpu_memory_total_bytes")),
        Record("job_rank:ugro_gpu_power:watts", on_rank_gpus("ugro_gpu_power_watts")),
        Record("job_rank:ugro_gpu_power_limit:watts", on_rank_gpus("ugro_gpu_power_limit_watts")),
        Record(
            "job_rank:ugro_gpu_temperature:celsius", on_rank_gpus("ugro_gpu_temperature_celsius")
        ),
        Record("job_rank:ugro_gpu_throttled:bool", on_rank_gpus("gpu:ugro_gpu_throttled:bool")),
        Record(
            "job_rank:ugro_gpu_sm_active:ratio",
            on_rank_gpus("ugro_gpu_sm_active_ratio"),
            why="Profiling-class activity (NVML GPM, Hopper and newer): the share of time the SMs, "
            "the\ntensor pipes and DRAM were busy, per rank's GPU.",
        ),
        Record(
            "job_rank:ugro_gpu_tensor_active:ratio", on_rank_gpus("ugro_gpu_tensor_active_ratio")
        ),
        Record("job_rank:ugro_gpu_dram_active:ratio", on_rank_gpus("ugro_gpu_dram_active_ratio")),
        Record(
            "job_rank:ugro_gpu_nvlink_throughput:bytes_per_second",
            on_rank_gpus("ugro_gpu_nvlink_throughput_bytes_per_second"),
            why="Interconnect traffic of each rank's GPU, per direction (tx, rx).",
        ),
        Record(
            "job_rank:ugro_gpu_pcie_throughput:bytes_per_second",
            on_rank_gpus("ugro_gpu_pcie_throughput_bytes_per_second"),
        ),
        Record(
            "job:ugro_gpu_sm_active:avg_ratio",
            "avg by (job_id) (job_rank:ugro_gpu_sm_active:ratio)",
        ),
        Record(
            "job:ugro_gpu_utilization:avg_ratio",
            "avg by (job_id) (job_rank:ugro_gpu_utilization:ratio)",
        ),
    ],
)

NODE_RATES = Group(
    "ugro-node-rates",
    why="""\
Per second rates of the exporters' counters, recorded here so that every reader (the
dashboards, a store that receives them by remote_write) sees Prometheus's own figures:
a store's rate() may compute differently (MetricsQL does not extrapolate).""",
    rules=[
        Record(
            "node:ugro_node_disk_read_bytes:rate1m", "rate(ugro_node_disk_read_bytes_total[1m])"
        ),
        Record(
            "node:ugro_node_disk_written_bytes:rate1m",
            "rate(ugro_node_disk_written_bytes_total[1m])",
        ),
        Record(
            "node:ugro_node_network_receive_bytes:rate1m",
            "rate(ugro_node_network_receive_bytes_total[1m])",
        ),
        Record(
            "node:ugro_node_network_transmit_bytes:rate1m",
            "rate(ugro_node_network_transmit_bytes_total[1m])",
        ),
        Record("gpu:ugro_gpu_pcie_replays:rate1m", "rate(ugro_gpu_pcie_replays_total[1m])"),
    ],
)

_P = HEALTH_POINTS
_HEALTH_WHY = f"""\
Node health, 0-100 = {_P["gpu"]} GPU + {_P["memory"]} memory + {_P["disk"]} disk \
+ {_P["cpu"]} CPU points:
  GPU    share of the node's GPUs up and not throttled by power or heat (a lost GPU
         counts as 0, one without clock readings as not throttled; full marks for a
         node without GPUs);
  memory available/total, full marks from {HEALTH_MEMORY_FULL_MARKS_AVAILABLE:.0%} available \
down to none at 0 %;
  disk   the fullest filesystem's free share, full marks from {HEALTH_DISK_FULL_MARKS_FREE:.0%} \
free;
  CPU    full marks up to {HEALTH_CPU_FULL_MARKS_BUSY:.0%} busy, none at 100 %."""
_MEMORY = "max by (node) (node:ugro_node_memory_available:ratio)"
_FULLEST = "min by (node) (node:ugro_node_filesystem_free:ratio)"
NODE_HEALTH = Group(
    "ugro-node-health",
    rules=[
        Record(
            "node:ugro_node_cpu_utilization:ratio5m",
            '1 - sum by (node) (rate(ugro_node_cpu_seconds_total{mode=~"idle|iowait"}[5m]))\n'
            "/ sum by (node) (rate(ugro_node_cpu_seconds_total[5m]))",
        ),
        Record(
            "node:ugro_node_memory_available:ratio",
            "ugro_node_memory_available_bytes / ugro_node_memory_total_bytes",
        ),
        Record(
            "node:ugro_node_filesystem_free:ratio",
            "ugro_node_filesystem_free_bytes / ugro_node_filesystem_size_bytes",
            why="Per filesystem (mountpoint label).",
        ),
        Record(
            "node:ugro_node_gpu_health:ratio",
            "avg by (node) (\n"
            "  ugro_gpu_up\n"
            "  * on (node, gpu) (\n"
            f"    1 - max by (node, gpu) (ugro_gpu_clock_event_active{{{THROTTLED}}})\n"
            "    or on (node, gpu) max by (node, gpu) (ugro_gpu_up * 0 + 1)\n"
            "  )\n"
            ")\n"
            "or on (node) (max by (node) (ugro_node_memory_total_bytes) * 0 + 1)",
            why=_HEALTH_WHY,
        ),
        Record(
            "node:ugro_node_health:score",
            f"{_P['gpu']} * node:ugro_node_gpu_health:ratio\n"
            f"+ on (node) {_P['memory']} * clamp({_MEMORY}"
            f" / {HEALTH_MEMORY_FULL_MARKS_AVAILABLE}, 0, 1)\n"
            f"+ on (node) {_P['disk']} * clamp({_FULLEST} / {HEALTH_DISK_FULL_MARKS_FREE}, 0, 1)\n"
            f"+ on (node) {_P['cpu']} * (1 - clamp((node:ugro_node_cpu_utilization:ratio5m"
            f" - {HEALTH_CPU_FULL_MARKS_BUSY}) / {1 - HEALTH_CPU_FULL_MARKS_BUSY:g}, 0, 1))",
        ),
    ],
)

GROUPS = [LIFECYCLE, RATES, PHASE_RULES, STRAGGLERS, GPUS, NODE_RATES, NODE_HEALTH]

HEADER = """\
Generated by `python -m ugro.alerts build` from catalogue/recording.py: edit that, not this.
Recording rules: the job-, rank- and node-level numbers that the alerts, the Grafana
dashboards, `ugro watch` and `ugro report` all read, so a number means the same thing
everywhere. Names follow level:metric:operations. Rank series carry the target labels
job_id, rank and node; `by (job_id)` aggregates a job's ranks."""
