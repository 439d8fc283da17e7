"""Names that PromQL in several places must agree on."""

from __future__ import annotations

# Scrape jobs (prometheus/prometheus.yml): the ranks' /metrics and the nodes' ugro-exporter.
RANKS_JOB = "ugro-ranks"
NODES_JOB = "ugro-nodes"
RANKS = f'job="{RANKS_JOB}"'
NODES = f'job="{NODES_JOB}"'

# The labels that identify a rank (its file_sd target's labels) and a GPU.
RANK_LABELS = "job_id, rank, node"
GPU_LABELS = "node, gpu"

# The clock-event reasons that mean "held down by power or heat" (the exporter's label values,
# exporter/gpu.py CLOCK_EVENT_REASONS). gpu_idle, application and display clock settings and
# sync boost are the GPU doing what it was asked: not throttling.
THROTTLE_REASONS = (
    "sw_power_cap",
    "hw_slowdown",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
)
THROTTLED = f'reason=~"{"|".join(THROTTLE_REASONS)}"'
