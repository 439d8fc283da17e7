"""The states alerts fire on and the console shows, one recording rule each.

A condition series exists exactly while its state holds; its value is the measurement the
state is about (seconds since the last step, a temperature, a free-space share), so an alert is
the condition plus a ``for:``, and its description can show ``$value``. The rules are
generated into the alert groups of ``alerts/rules.yml``, ahead of the alerts that read them:
Prometheus evaluates a group's rules in turn at one timestamp, so an alert sees its condition
of the same evaluation. Dashboards, ``ugro watch`` and ``ugro report`` read these series and
never restate a threshold.
"""

from __future__ import annotations

from .names import NODES, RANK_LABELS
from .promql import new_events
from .rules import Record
from .thresholds import Thresholds

# A filesystem predicted to fill up is only worth a warning once it is below this free share:
# a nearly empty disk that is being written to fast is not news.
DISK_FILL_ONLY_BELOW_FREE_RATIO = 0.4
# The window in which an XID or uncorrectable ECC error counts as new.
GPU_ERROR_WINDOW = "5m"
# The window of the rates the straggler score compares (recording.py's rate1m rules).
STRAGGLER_MIN_AGE = "1m"
# The throughput-drop condition compares a job with its own average over this long.
THROUGHPUT_BASELINE_WINDOW = "30m"

# Condition series names, for the alerts and the console.
NONFINITE = "job_rank:ugro_train_nonfinite:condition"
NONFINITE_COUNT = "job_rank:ugro_train_nonfinite:count"  # NONFINITE, 0 where it has no series
LOSS_SPIKE = "job_rank:ugro_train_loss_spike:condition"
LOSS_ABOVE_CEILING = "job_rank:ugro_train_loss_above_ceiling:condition"
STALLED = "job_rank:ugro_train_stalled:condition"
NOT_STARTED = "job_rank:ugro_train_not_started:condition"
HUNG_RANK = "job_rank:ugro_train_hung_rank:condition"
CHECKPOINT_OVERDUE = "job_rank:ugro_train_checkpoint_overdue:condition"
LEAST_PROGRESSED = "job_rank:ugro_train_least_progressed:score"  # a recording (recording.py)
THROUGHPUT_DROP = "job:ugro_train_throughput_drop:condition"
STRAGGLER = "job_rank:ugro_train_straggler:condition"
RANKS_DOWN = "job:ugro_train_ranks_down:condition"
GPU_UTILIZATION_LOW = "job_rank:ugro_gpu_utilization_low:condition"
TENSOR_IDLE = "job_rank:ugro_gpu_tensor_idle:condition"
ALLOCATOR_RETRIES = "job_rank:ugro_train_allocator_retries:condition"
GPU_TEMPERATURE_WARNING = "gpu:ugro_gpu_temperature_warning:condition"
GPU_TEMPERATURE_CRITICAL = "gpu:ugro_gpu_temperature_critical:condition"
GPU_THROTTLED = "gpu:ugro_gpu_throttled:bool"  # a recording: "throttled" has no threshold
GPU_MEMORY_FULL = "gpu:ugro_gpu_memory_full:condition"
GPU_XID = "gpu:ugro_gpu_xid:condition"
GPU_ECC_UNCORRECTABLE = "gpu:ugro_gpu_ecc_uncorrectable:condition"
GPU_LOST = "gpu:ugro_gpu_lost:condition"
GPU_RECOVERY = "gpu:ugro_gpu_recovery_requested:condition"
DISK_FULL_WARNING = "node:ugro_node_disk_full_warning:condition"
DISK_FULL_CRITICAL = "node:ugro_node_disk_full_critical:condition"
DISK_FILLING = "node:ugro_node_disk_filling:condition"
MEMORY_PRESSURE = "node:ugro_node_memory_pressure:condition"
CPU_SATURATED = "node:ugro_node_cpu_saturated:condition"
EXPORTER_DOWN = "node:ugro_node_exporter_down:condition"
COLLECTOR_DOWN = "node:ugro_node_collector_down:condition"


def training(t: Thresholds) -> list[Record]:
    tr = t.training
    return [
        Record(
            NONFINITE,
            new_events("ugro_train_nonfinite_total", tr.nonfinite_window),
            why="Non-finite losses or gradient norms counted within nonfinite_window; one series "
            "per quantity.",
        ),
        Record(
            NONFINITE_COUNT,
            f"{NONFINITE}\nor ugro_train_nonfinite_total * 0",
            why="The same count, and 0 for every rank and quantity without events: what the "
            "dashboard graphs,\nrecorded once per cycle (a panel that filled the zeros itself "
            "read every rank's counter\nat every point). Not a condition: it always exists.",
        ),
        Record(
            LOSS_SPIKE,
            "job_rank:ugro_train_loss:mean1m\n"
            f"> {tr.loss_spike_factor} * job_rank:ugro_train_loss:mean15m",
        ),
        Record(LOSS_ABOVE_CEILING, f"job_rank:ugro_train_loss:mean5m > {tr.loss_ceiling}"),
        Record(
            STALLED,
            "(time() - ugro_train_last_step_timestamp_seconds)\n"
            f"> clamp_min({tr.stall_step_multiple} * (\n"
            "    job_rank:ugro_train_step_duration_seconds:mean >= 0\n"
            "    or ugro_train_last_step_timestamp_seconds * 0\n"
            f"  ), {tr.stall_min_seconds})",
            why="Seconds since the rank's last step, while more than stall_step_multiple of its "
            "mean step\ntime (and stall_min_seconds). The first step is not timed: until a "
            "second one, the\nmean is 0/0 and counts as 0.",
        ),
        Record(
            HUNG_RANK,
            "(time() - ugro_train_last_step_timestamp_seconds)\n"
            f"* on ({RANK_LABELS}) group_right () (0 * {LEAST_PROGRESSED} + 1)\n"
            f"and on (job_id) (count by (job_id) ({LEAST_PROGRESSED}) == 1)\n"
            f"and on (job_id) {STALLED}",
            why="""\
The rank a stalled job waits for: the only one with the job's lowest progress score (the
healthy ranks ran on to the next collective). Seconds since its last step, with its phase.
Ranks level with each other (all in one checkpoint, say) name none.""",
        ),
        Record(
            NOT_STARTED,
            "(time() - ugro_train_start_time_seconds) > "
            f"{tr.not_started_seconds}\n"
            f"unless on ({RANK_LABELS}) (ugro_train_steps_total > 0)\n"
            f"unless on ({RANK_LABELS}) ugro_train_end_time_seconds",
            why="""\
Seconds since a rank's telemetry started, when that is more than not_started_seconds and
it has completed no step. A rank that has not created its Telemetry yet serves nothing and
is not counted; one that closed its telemetry (a run without steps) is not late.""",
        ),
        *_checkpoint_overdue(tr.checkpoint_max_age_seconds),
        Record(
            THROUGHPUT_DROP,
            "job:ugro_train_tokens:rate1m\n"
            f"< {tr.throughput_drop_ratio}"
            f" * avg_over_time(job:ugro_train_tokens:rate1m[{THROUGHPUT_BASELINE_WINDOW}])",
        ),
        Record(
            STRAGGLER,
            f"job_rank:ugro_train_straggler_score:ratio < {tr.straggler_ratio}\n"
            f"and on (job_id, rank) ugro_train_steps_total offset {STRAGGLER_MIN_AGE}",
            why="Only a rank that has been stepping for a whole rate window: before that its "
            "1-minute rates\nare extrapolated from a few samples, and a healthy job's ranks "
            "can differ by chance.",
        ),
        Record(
            RANKS_DOWN,
            "count by (job_id) (job_rank:ugro_train_down:bool) > 0",
            why='Down, not "not started yet" nor "finished": see the lifecycle rules '
            "(recording.yml).",
        ),
        Record(
            GPU_UTILIZATION_LOW,
            f"job_rank:ugro_gpu_utilization:ratio < {tr.gpu_utilization_low_ratio}",
        ),
        Record(
            TENSOR_IDLE,
            f"job_rank:ugro_gpu_tensor_active:ratio < {tr.tensor_active_low_ratio}\n"
            "and on (job_id, rank) job_rank:ugro_train_steps:rate1m > 0",
            why="A rank that steps while its GPU's tensor pipes stay (nearly) idle: GPUs without "
            "GPM\nhave no tensor activity series and never match.",
        ),
        Record(
            ALLOCATOR_RETRIES,
            f"({new_events('ugro_train_cuda_alloc_retries_total', tr.allocator_retries_window)})\n"
            f"> {tr.allocator_retries_count}",
            why="CUDA caching-allocator retries (it freed its cache to satisfy an allocation) "
            "within\nallocator_retries_window: memory is nearly exhausted; OOMs tend to follow.",
        ),
    ]


def _checkpoint_overdue(max_age_seconds: float | None) -> list[Record]:
    if max_age_seconds is None:  # off unless the thresholds file sets it
        return []
    return [
        Record(
            CHECKPOINT_OVERDUE,
            f"(time() - ugro_train_last_checkpoint_timestamp_seconds) > {max_age_seconds}\n"
            f"or (\n  (time() - ugro_train_process_start_time_seconds) > {max_age_seconds}\n"
            "  unless on (job_id) ugro_train_last_checkpoint_timestamp_seconds\n)",
            why="""\
Seconds since a rank's last checkpoint, or since its process started while no rank of its
job has checkpointed, when more than checkpoint_max_age_seconds. Only the ranks that write
count once one has: other ranks of a framework may never see a checkpoint.""",
        )
    ]


def gpu(t: Thresholds) -> list[Record]:
    g = t.gpu
    return [
        Record(
            GPU_TEMPERATURE_WARNING,
            f"ugro_gpu_temperature_celsius > {g.temperature_warning_celsius}",
        ),
        Record(
            GPU_TEMPERATURE_CRITICAL,
            f"ugro_gpu_temperature_celsius > {g.temperature_critical_celsius}",
        ),
        Record(GPU_MEMORY_FULL, f"gpu:ugro_gpu_memory_used:ratio > {g.memory_full_ratio}"),
        Record(GPU_XID, new_events("ugro_gpu_xid_errors_total", GPU_ERROR_WINDOW)),
        Record(
            GPU_ECC_UNCORRECTABLE,
            new_events('ugro_gpu_ecc_errors_total{type="uncorrected"}', GPU_ERROR_WINDOW),
        ),
        Record(GPU_LOST, "ugro_gpu_up == 0"),
        Record(
            GPU_RECOVERY,
            "ugro_gpu_recovery_action > 0",
            why="The driver's recovery action (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION): 1 GPU reset, "
            "2 node\nreboot, 3 drain peer-to-peer, 4 drain and reset.",
        ),
    ]


def node(t: Thresholds) -> list[Record]:
    n = t.node
    FREE = "node:ugro_node_filesystem_free:ratio"
    return [
        Record(
            DISK_FULL_WARNING, f"node:ugro_node_filesystem_free:ratio < {n.disk_free_warning_ratio}"
        ),
        Record(
            DISK_FULL_CRITICAL,
            f"node:ugro_node_filesystem_free:ratio < {n.disk_free_critical_ratio}",
        ),
        Record(
            DISK_FILLING,
            "predict_linear(ugro_node_filesystem_free_bytes[1h], "
            f"{n.disk_fill_hours} * 3600) < 0\n"
            f"and {FREE} < {DISK_FILL_ONLY_BELOW_FREE_RATIO}",
        ),
        Record(
            MEMORY_PRESSURE,
            f"node:ugro_node_memory_available:ratio < {n.memory_available_ratio}",
        ),
        Record(
            CPU_SATURATED,
            f"node:ugro_node_cpu_utilization:ratio5m > {n.cpu_saturation_ratio}",
        ),
        Record(EXPORTER_DOWN, f"up{{{NODES}}} == 0"),
        Record(
            COLLECTOR_DOWN,
            "ugro_exporter_collector_up == 0\n"
            "unless on (instance, collector) ugro_exporter_collector_down_reason{\n"
            '  collector="gpu", reason=~"library_not_found|module_missing"}',
            why="A GPU collector on a node without the NVIDIA driver or pynvml is not down: "
            "there is\nnothing to collect.",
        ),
    ]
