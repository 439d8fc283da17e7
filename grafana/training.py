"""The training job dashboard (uid ``ugro-training``): is the job progressing, is a rank slow or
diverging, are its GPUs busy and healthy, is anything firing.

Rank series carry the target labels ``job_id``, ``rank`` and ``node``; a rank's GPU readings
are the recorded per-rank GPU series (the node exporter's, joined on ``gpu_uuid`` with
``ugro_train_rank_info``). States the alerts fire on are read from their condition series
(ugro.catalogue.conditions), and thresholds drawn on graphs are the alerts' own
(alerts/thresholds.yml), so the dashboard never restates a condition.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.models import dashboard as model

from ugro.catalogue import conditions, goodput, recording
from ugro.catalogue.thresholds import Thresholds
from ugro.common import phases

from . import presets as p

UID = "ugro-training"

JOB = 'job_id="$job_id"'
RANKS = 'job_id="$job_id", node=~"$node", rank=~"$rank"'
RANK = "rank {{rank}}"


def or_zero_per_rank(expr: str, rank_series: str) -> str:
    """``expr``, or 0 for each chosen rank it has no series for: a condition series exists only
    while its state holds, and a graph of nothing reads as "no data" rather than "none"."""
    return f"{expr} or on (rank) (max by (rank) ({rank_series}{{{RANKS}}}) * 0)"


def firing(selector: str) -> str:
    """The job's firing alerts, and its nodes' own (GPU, host) alerts that carry no job."""
    return (
        f'ALERTS{{alertstate="firing", {selector}}}'
        ' or ALERTS{alertstate="firing", job_id="", node=~"$node"}'
    )


# -- overview ------------------------------------------------------------------------------


def world_size():
    return p.single_value(
        "World size",
        "Ranks of the job that report telemetry (ugro_train_rank_info).",
        p.COUNT,
        f"count(ugro_train_rank_info{{{JOB}}})",
    )


def current_step():
    return p.single_value(
        "Step",
        "Optimizer steps completed by the furthest rank.",
        p.COUNT,
        f"max(ugro_train_steps_total{{{JOB}}})",
    )


def progress():
    return p.single_value(
        "Progress",
        "Steps completed over the configured total (ugro_train_target_steps); empty when the "
        "training loop did not give a total.",
        p.RATIO,
        f"job:ugro_train_progress:ratio{{{JOB}}}",
    )


def job_throughput():
    return p.single_value(
        "Tokens/s",
        "Tokens per second over the last minute, summed over the job's ranks.",
        p.TOKENS_PER_SECOND,
        f"job:ugro_train_tokens:rate1m{{{JOB}}}",
    )


def job_mean_loss():
    return p.single_value(
        "Mean loss (5m)",
        "Mean of every finite per-step loss of every rank over the last 5 minutes.",
        p.NO_UNIT,
        f"job:ugro_train_loss:mean5m{{{JOB}}}",
        decimals=3,
    )


def elapsed():
    return p.single_value(
        "Elapsed",
        "From the first rank's telemetry start to the latest completed step.",
        p.SECONDS,
        f"max(ugro_train_last_step_timestamp_seconds{{{JOB}}})"
        f" - min(ugro_train_start_time_seconds{{{JOB}}})",
    )


def firing_count():
    return p.single_value(
        "Alerts firing",
        "Alerts firing now for this job, or for its nodes (GPU, host).",
        p.COUNT,
        f"count({firing(JOB)}) or vector(0)",
        red_from=1,
    )


# -- training ------------------------------------------------------------------------------


def loss():
    return p.graph(
        "Loss",
        "Each rank's mean finite loss over the last minute, and the job's 5-minute mean. "
        "A rank apart from the others is diverging; a rising mean is a spike.",
        p.NO_UNIT,
        p.query(f"job_rank:ugro_train_loss:mean1m{{{RANKS}}}", RANK, "A"),
        p.query(f"job:ugro_train_loss:mean5m{{{JOB}}}", "job mean (5m)", "B"),
        width=12,
    )


def gradient_norm():
    return p.graph(
        "Gradient norm",
        "Each rank's mean finite gradient norm (before clipping) over the last minute, and "
        "the job's 5-minute mean.",
        p.NO_UNIT,
        p.query(f"job_rank:ugro_train_grad_norm:mean1m{{{RANKS}}}", RANK, "A"),
        p.query(f"job:ugro_train_grad_norm:mean5m{{{JOB}}}", "job mean (5m)", "B"),
        width=12,
    )


def learning_rate():
    return p.graph(
        "Learning rate",
        "The learning rate of each rank's first parameter group at its last step.",
        p.NO_UNIT,
        p.query(f"ugro_train_learning_rate{{{RANKS}}}", RANK),
    )


def rank_throughput():
    return p.graph(
        "Throughput per rank",
        "Tokens per second each rank processed over the last minute.",
        p.TOKENS_PER_SECOND,
        p.query(f"job_rank:ugro_train_tokens:rate1m{{{RANKS}}}", RANK),
        minimum=0,
    )


def step_time():
    return p.graph(
        "Step time",
        "Each rank's mean step time over the last minute, and its 90th percentile over the "
        "last minute (from the step-duration histogram).",
        p.SECONDS,
        p.query(
            f"job_rank:ugro_train_step_duration_seconds:mean1m{{{RANKS}}}",
            "rank {{rank}} mean",
            "A",
        ),
        p.query(
            f"job_rank:ugro_train_step_duration_seconds:p90_1m{{{RANKS}}}",
            "rank {{rank}} p90",
            "B",
        ),
        minimum=0,
    )


def straggler_score(thresholds: Thresholds):
    return p.graph(
        "Straggler score",
        "Each rank's effective throughput (tokens/s while not waiting for input) over the job "
        "median: 1 is the median rank. The dashed line is the straggler alert's threshold.",
        p.NO_UNIT,
        p.query(f"job_rank:ugro_train_straggler_score:ratio{{{RANKS}}}", RANK),
        minimum=0,
        threshold=thresholds.training.straggler_ratio,
    )


def data_wait():
    return p.graph(
        "Input wait",
        "Share of each rank's time spent waiting for its next batch over the last minute. "
        "Under synchronous DDP every rank steps together, so a slow input pipeline shows "
        "here, not in tokens/s.",
        p.RATIO,
        p.query(f"1 - job_rank:ugro_train_busy:ratio1m{{{RANKS}}}", RANK),
        minimum=0,
        maximum=1,
    )


def nonfinite_steps(thresholds: Thresholds):
    window = thresholds.training.nonfinite_window
    return p.graph(
        "Non-finite steps",
        f"Steps whose loss or gradient norm was NaN or infinite, per rank and quantity, within "
        f"the last {window}: the count the critical alert fires on, exact (a rank's first "
        "event counts too).",
        p.COUNT,
        p.query(
            # Recorded with a 0 for each rank and quantity without events: both quantities are
            # counted from the first scrape, so both sides of the rule's `or` have the same
            # labels, which Prometheus and a MetricsQL store (whose `or on (...)` fills gaps
            # differently) join alike.
            f"sum by (rank, quantity) ({conditions.NONFINITE_COUNT}{{{RANKS}}})",
            "rank {{rank}} {{quantity}}",
        ),
        minimum=0,
    )


def since_last_step():
    return p.graph(
        "Time since last step",
        "Seconds since each rank completed a step: a rising line is a stalled rank.",
        p.SECONDS,
        p.query(f"time() - ugro_train_last_step_timestamp_seconds{{{RANKS}}}", RANK),
        minimum=0,
    )


# -- where the time went ------------------------------------------------------------------

# The colour a phase has wherever the dashboard shows it: the productive ones green.
PHASE_COLORS = {
    phases.STARTUP: "purple",
    phases.DATA: "orange",
    phases.STEP: "green",
    phases.FORWARD: "green",
    phases.BACKWARD: "semi-dark-green",
    phases.OPTIMIZER: "dark-green",
    phases.CHECKPOINT: "blue",
    phases.EVALUATION: "yellow",
}
assert set(PHASE_COLORS) == set(phases.PHASES)


def phase_shares():
    productive = ", ".join(goodput.PHASES_OF[goodput.PRODUCTIVE])
    return p.graph(
        "Where the time went",
        "The job's rank-time per phase over the last 5 minutes, averaged over its ranks (they "
        f"add up to 100 %). Productive: {productive}; the rest is waiting for input, "
        "checkpointing, evaluating and starting up. A hung rank's time stays in the phase it "
        "hangs in; `ugro report` also takes out stalls and restarts.",
        p.RATIO,
        p.query(
            f"job_phase:ugro_train_phase_seconds:avg_rate5m{{{JOB}}}",
            "{{phase}}",
        ),
        width=12,
        minimum=0,
        maximum=1,
        stacked=True,
    )


def rank_phases():
    return p.named_states(
        "Phase per rank",
        "The phase each rank is in at each scrape. When a job hangs, the rank the others wait "
        "for is the one in another phase (or a step behind): TrainingHungRank names it.",
        p.query(f"max by (rank) ({recording.PHASE_INDEX}{{{RANKS}}})", RANK),
        names={code: (phase, PHASE_COLORS[phase]) for code, phase in enumerate(phases.PHASES)},
        width=12,
        height=8,
    )


def goodput_ratio():
    return p.single_value(
        "Goodput (5m)",
        "The productive phases' share of the job's rank-time over the last 5 minutes.",
        p.RATIO,
        f"job:ugro_train_goodput:ratio_rate5m{{{JOB}}}",
        width=6,
    )


def checkpoint_count():
    return p.single_value(
        "Checkpoints",
        "Checkpoints completed (Telemetry.checkpoint), by the rank that completed most; empty "
        "before the first.",
        p.COUNT,
        f"max(ugro_train_checkpoints_total{{{JOB}}})",
        width=6,
    )


def checkpoint_age(thresholds: Thresholds):
    limit = thresholds.training.checkpoint_max_age_seconds
    return p.single_value(
        "Last checkpoint",
        "Seconds since the job's latest checkpoint completed"
        + (f"; red past the checkpoint alert's limit ({limit:g} s)." if limit is not None else "."),
        p.SECONDS,
        f"time() - max(ugro_train_last_checkpoint_timestamp_seconds{{{JOB}}})",
        width=6,
        red_from=limit,
    )


def checkpoint_duration():
    return p.single_value(
        "Last checkpoint took",
        "How long the latest checkpoint took, on the slowest rank.",
        p.SECONDS,
        f"max(ugro_train_last_checkpoint_duration_seconds{{{JOB}}})",
        width=6,
    )


# -- the job's GPUs ------------------------------------------------------------------------


def gpu_utilization():
    return p.graph(
        "GPU utilisation",
        "Share of time a kernel ran on the GPU each rank uses (NVML, via the node exporter).",
        p.RATIO,
        p.query(f"job_rank:ugro_gpu_utilization:ratio{{{RANKS}}}", RANK),
        minimum=0,
        maximum=1,
    )


def gpu_memory():
    return p.graph(
        "GPU memory",
        "Device memory in use on each rank's GPU, and the memory installed.",
        p.BYTES,
        p.query(f"job_rank:ugro_gpu_memory_used:bytes{{{RANKS}}}", "rank {{rank}} used", "A"),
        p.query(f"job_rank:ugro_gpu_memory_total:bytes{{{RANKS}}}", "rank {{rank}} total", "B"),
        minimum=0,
    )


def gpu_temperature(thresholds: Thresholds):
    return p.graph(
        "GPU temperature",
        "Core temperature of each rank's GPU. The dashed line is the temperature warning.",
        p.CELSIUS,
        p.query(f"job_rank:ugro_gpu_temperature:celsius{{{RANKS}}}", RANK),
        threshold=thresholds.gpu.temperature_warning_celsius,
    )


def gpu_power():
    return p.graph(
        "GPU power",
        "Board power draw of each rank's GPU, and its enforced power limit.",
        p.WATTS,
        p.query(f"job_rank:ugro_gpu_power:watts{{{RANKS}}}", "rank {{rank}}", "A"),
        p.query(f"job_rank:ugro_gpu_power_limit:watts{{{RANKS}}}", "rank {{rank}} limit", "B"),
        minimum=0,
    )


def gpu_throttling():
    return p.states(
        "GPU throttling",
        "Whether each rank's GPU is throttled by power or heat (power cap, thermal or "
        "hardware slowdown), and by which reason while it is: the state the throttling alert "
        "fires on once it lasts. Idle and clock settings are not throttling.",
        p.query(
            or_zero_per_rank(
                f"max by (rank, reason) (job_rank:ugro_gpu_throttled:bool{{{RANKS}}})",
                "job_rank:ugro_gpu_utilization:ratio",
            ),
            "rank {{rank}} {{reason}}",
        ),
        ok="not active",
        bad="active",
        width=16,
    )


# -- alerts --------------------------------------------------------------------------------


def mfu():
    return p.graph(
        "MFU",
        "Model FLOPs utilisation: the model FLOP/s the ranks achieve (the FLOPs per token or "
        "sample the loop declared, times what it processed) over their devices' dense peak for "
        "the training dtype. Absent where the loop declared no FLOPs or no peak is known.",
        p.RATIO,
        p.query(f"job_rank:ugro_train_mfu:ratio1m{{{RANKS}}}", RANK, "A"),
        p.query(f"job:ugro_train_mfu:ratio1m{{{JOB}}}", "job", "B"),
        minimum=0,
    )


def gpu_activity(title: str, series: str, what: str):
    return p.graph(
        title,
        f"Share of time {what} on the GPU each rank uses, from NVML's GPM (Hopper and newer "
        "GPUs; absent on others). Unlike utilisation, it shows how much of the GPU works, not "
        "only whether a kernel runs.",
        p.RATIO,
        p.query(f"{series}{{{RANKS}}}", RANK),
        minimum=0,
        maximum=1,
    )


def interconnect():
    return p.graph(
        "NVLink and PCIe",
        "Bytes per second each rank's GPU sends (tx) and receives (rx) over NVLink (all links) "
        "and PCIe.",
        p.BYTES_PER_SECOND,
        p.query(
            f"job_rank:ugro_gpu_nvlink_throughput:bytes_per_second{{{RANKS}}}",
            "rank {{rank}} NVLink {{direction}}",
            "A",
        ),
        p.query(
            f"job_rank:ugro_gpu_pcie_throughput:bytes_per_second{{{RANKS}}}",
            "rank {{rank}} PCIe {{direction}}",
            "B",
        ),
        minimum=0,
    )


def firing_alerts():
    return p.listing(
        "Firing alerts",
        "Alerts firing now for this job (and its nodes' own GPU and host alerts), as "
        "Prometheus evaluates them. Notifications go out through Alertmanager.",
        firing(JOB),
        {
            "alertname": "Alert",
            "severity": "Severity",
            "rank": "Rank",
            "node": "Node",
            "gpu": "GPU",
        },
    )


def alert_annotations() -> dash.AnnotationQuery:
    return p.alert_annotation(
        "Alerts",
        f'ALERTS{{alertstate="firing", {JOB}}}',
        "Alerts of the job: a region while each fires.",
    )


def dashboard(thresholds: Thresholds) -> dash.Dashboard:
    board = (
        dash.Dashboard("ugro · training job")
        .uid(UID)
        .description("One training job: progress, per-rank health, its GPUs and its alerts.")
        .tags(["ugro", "training"])
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .readonly()
        .with_variable(p.datasource_variable())
        .with_variable(
            p.label_variable(
                "job_id",
                "Job",
                "ugro_train_rank_info",
                multi=False,
                description="The training job (ugro-launch's job id).",
            )
        )
        .with_variable(
            p.label_variable(
                "node",
                "Node",
                'ugro_train_rank_info{job_id="$job_id"}',
                multi=True,
                description="The job's nodes.",
            )
        )
        .with_variable(
            p.label_variable(
                "rank",
                "Rank",
                'ugro_train_rank_info{job_id="$job_id", node=~"$node"}',
                multi=True,
                description="The job's ranks on the chosen nodes.",
            )
        )
        .annotation(alert_annotations())
        .link(p.dashboard_link("Cluster health", "ugro-cluster"))
    )
    rows = [
        (
            dash.Row("Overview"),
            [
                world_size().span(3),
                current_step().span(3),
                progress().span(3),
                job_throughput(),
                job_mean_loss(),
                elapsed(),
                firing_count().span(3),
            ],
        ),
        (
            dash.Row("Training"),
            [
                loss(),
                gradient_norm(),
                learning_rate(),
                rank_throughput(),
                step_time(),
                straggler_score(thresholds),
                data_wait(),
                nonfinite_steps(thresholds),
                since_last_step(),
            ],
        ),
        (
            dash.Row("Where the time went"),
            [
                phase_shares(),
                rank_phases(),
                goodput_ratio(),
                checkpoint_count(),
                checkpoint_age(thresholds),
                checkpoint_duration(),
            ],
        ),
        (
            dash.Row("GPUs of the job"),
            [
                gpu_utilization(),
                gpu_memory(),
                gpu_temperature(thresholds),
                gpu_power(),
                gpu_throttling(),
            ],
        ),
        (
            dash.Row("Efficiency"),
            [
                mfu(),
                gpu_activity("SM active", "job_rank:ugro_gpu_sm_active:ratio", "the SMs were busy"),
                gpu_activity(
                    "Tensor pipes active",
                    "job_rank:ugro_gpu_tensor_active:ratio",
                    "any tensor pipe was busy",
                ),
                gpu_activity(
                    "DRAM bandwidth active",
                    "job_rank:ugro_gpu_dram_active:ratio",
                    "device memory moved data",
                ),
                interconnect(),
            ],
        ),
        (dash.Row("Alerts"), [firing_alerts()]),
    ]
    return p.numbered(rows, board)
