"""The cluster health dashboard (uid ``ugro-cluster``): every node and GPU, whatever job runs.

Series come from each node's ``ugro-exporter`` (scrape job ``ugro-nodes``), labelled with
``node`` and, for GPUs, ``gpu`` (the NVML index) and ``gpu_uuid``. Ratios are the recorded ones,
states the alerts fire on are read from their condition series (ugro.catalogue.conditions), and
thresholds drawn on graphs are the alerts' own (alerts/thresholds.yml), so the dashboard never
restates a condition.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.models import dashboard as model

from ugro.catalogue import conditions, names
from ugro.catalogue.thresholds import Thresholds

from . import presets as p

UID = "ugro-cluster"

NODES = 'node=~"$node"'
GPU = "{{node}} GPU {{gpu}}"


# -- overview ------------------------------------------------------------------------------


def nodes_up():
    return p.single_value(
        "Nodes up",
        "Node exporters answering Prometheus's scrapes.",
        p.COUNT,
        f"sum(up{{{names.NODES}, {NODES}}})",
    )


def gpus_up():
    return p.single_value(
        "GPUs up",
        "GPUs answering NVML on the chosen nodes; a lost GPU (fallen off the bus) is not.",
        p.COUNT,
        f"sum(ugro_gpu_up{{{NODES}}})",
    )


def gpus_lost():
    return p.single_value(
        "GPUs lost",
        "GPUs NVML reports lost (GPU_IS_LOST or UNKNOWN), as the GPU-lost alert counts them: "
        "they need a reset or a reboot.",
        p.COUNT,
        f"count({conditions.GPU_LOST}{{{NODES}}}) or vector(0)",
        red_from=1,
    )


def node_alerts():
    return p.single_value(
        "Alerts firing",
        "Alerts firing now on the chosen nodes: GPU, host and training alerts alike.",
        p.COUNT,
        f'count(ALERTS{{alertstate="firing", {NODES}}}) or vector(0)',
        red_from=1,
    )


def health_scores():
    return p.graph(
        "Node health score",
        "0-100 per node: 40 points for GPUs up and not throttled by power or heat, 20 for "
        "available memory, 20 for free disk, 20 for CPU headroom (prometheus/rules/"
        "recording.yml says how each is scored).",
        p.NO_UNIT,
        p.query(f"node:ugro_node_health:score{{{NODES}}}", "{{node}}"),
        minimum=0,
        maximum=100,
        width=12,
    )


# -- GPUs ----------------------------------------------------------------------------------


def gpu_utilization():
    return p.graph(
        "GPU utilisation",
        "Share of time a kernel ran, per GPU.",
        p.RATIO,
        p.query(f"ugro_gpu_utilization_ratio{{{NODES}}}", GPU),
        minimum=0,
        maximum=1,
    )


def gpu_activity():
    return p.graph(
        "SM and tensor activity",
        "Share of time the SMs and any tensor pipe were busy, per GPU, from NVML's GPM (Hopper "
        "and newer GPUs; absent on others): how much of each GPU works, not only whether a "
        "kernel runs.",
        p.RATIO,
        p.query(f"ugro_gpu_sm_active_ratio{{{NODES}}}", GPU + " SM", "A"),
        p.query(f"ugro_gpu_tensor_active_ratio{{{NODES}}}", GPU + " tensor", "B"),
        minimum=0,
        maximum=1,
    )


def gpu_interconnect():
    return p.graph(
        "NVLink",
        "Bytes per second each GPU sends (tx) and receives (rx) over all its NVLinks.",
        p.BYTES_PER_SECOND,
        p.query(f"ugro_gpu_nvlink_throughput_bytes_per_second{{{NODES}}}", GPU + " {{direction}}"),
        minimum=0,
    )


def gpu_memory(thresholds: Thresholds):
    return p.graph(
        "GPU memory used",
        "Device memory in use over memory installed, per GPU. The dashed line is the "
        "memory-full alert's threshold.",
        p.RATIO,
        p.query(f"gpu:ugro_gpu_memory_used:ratio{{{NODES}}}", GPU),
        minimum=0,
        maximum=1,
        threshold=thresholds.gpu.memory_full_ratio,
    )


def gpu_temperature(thresholds: Thresholds):
    return p.graph(
        "GPU temperature",
        "Core temperature per GPU. The dashed line is the temperature warning.",
        p.CELSIUS,
        p.query(f"ugro_gpu_temperature_celsius{{{NODES}}}", GPU),
        threshold=thresholds.gpu.temperature_warning_celsius,
    )


def gpu_power():
    return p.graph(
        "GPU power",
        "Board power draw over the enforced power limit, per GPU.",
        p.RATIO,
        p.query(f"ugro_gpu_power_watts{{{NODES}}} / ugro_gpu_power_limit_watts{{{NODES}}}", GPU),
        minimum=0,
    )


def gpu_sm_clock():
    return p.graph(
        "SM clock",
        "Streaming-multiprocessor clock per GPU; a drop under load is throttling.",
        "hertz",
        p.query(f"ugro_gpu_sm_clock_hertz{{{NODES}}}", GPU),
        minimum=0,
    )


def gpu_throttling():
    return p.graph(
        "GPUs throttled, by reason",
        "How many GPUs of each node are throttled by power or heat, by reason (power cap, "
        "thermal or hardware slowdown): the state the throttling alert fires on once it lasts. "
        "Idle and clock settings are not throttling.",
        p.COUNT,
        p.query(
            f"count by (node, reason) ({conditions.GPU_THROTTLED}{{{NODES}}})"
            # 0 for a node with none throttled: the recorded series exists only while throttled.
            f" or on (node) (max by (node) (ugro_gpu_up{{{NODES}}}) * 0)",
            "{{node}} {{reason}}",
        ),
        minimum=0,
    )


def ecc_errors():
    return p.graph(
        "ECC errors",
        "ECC errors per GPU since the driver loaded (NVML's volatile counters). Uncorrected "
        "errors are critical: the GPU's memory is corrupting data.",
        p.COUNT,
        p.query(f"ugro_gpu_ecc_errors_total{{{NODES}}}", "{{node}} GPU {{gpu}} {{type}}"),
        minimum=0,
    )


def xid_errors():
    return p.graph(
        "XID errors",
        "XID (critical driver) events per GPU and code since the exporter started. A series "
        "appears with the first event.",
        p.COUNT,
        p.query(f"ugro_gpu_xid_errors_total{{{NODES}}}", "{{node}} GPU {{gpu}} XID {{xid}}"),
        minimum=0,
    )


def pcie_replays():
    return p.graph(
        "PCIe replays",
        "PCIe link-level retransmissions per second over the last minute, per GPU: a rising "
        "rate is a bad link.",
        "ops",
        p.query(f"gpu:ugro_gpu_pcie_replays:rate1m{{{NODES}}}", GPU),
        minimum=0,
    )


# -- hosts ---------------------------------------------------------------------------------


def cpu_utilization(thresholds: Thresholds):
    return p.graph(
        "CPU utilisation",
        "Share of CPU time not idle, over 5 minutes. The dashed line is CPU saturation.",
        p.RATIO,
        p.query(f"node:ugro_node_cpu_utilization:ratio5m{{{NODES}}}", "{{node}}"),
        minimum=0,
        maximum=1,
        threshold=thresholds.node.cpu_saturation_ratio,
    )


def load_per_cpu():
    return p.graph(
        "Load per CPU",
        "1-minute load average over the number of logical CPUs.",
        p.NO_UNIT,
        p.query(f"ugro_node_load1{{{NODES}}} / ugro_node_cpus{{{NODES}}}", "{{node}}"),
        minimum=0,
    )


def memory_used():
    return p.graph(
        "Memory used",
        "Memory in use (total minus available) over total, and swap in use.",
        p.RATIO,
        p.query(f"1 - node:ugro_node_memory_available:ratio{{{NODES}}}", "{{node}} memory", "A"),
        p.query(f"ugro_node_swap_used_bytes{{{NODES}}}", "{{node}} swap bytes", "B"),
        minimum=0,
    ).override_by_regexp(".* swap bytes", [model.DynamicConfigValue(id_val="unit", value="bytes")])


def disk_free(thresholds: Thresholds):
    return p.graph(
        "Disk free",
        "Free space over size per filesystem. The dashed line is the disk-full warning.",
        p.RATIO,
        p.query(f"node:ugro_node_filesystem_free:ratio{{{NODES}}}", "{{node}} {{mountpoint}}"),
        minimum=0,
        maximum=1,
        threshold=thresholds.node.disk_free_warning_ratio,
    )


def disk_io():
    return p.graph(
        "Disk I/O",
        "Bytes read and written per second over the last minute, per disk.",
        p.BYTES_PER_SECOND,
        p.query(
            f"node:ugro_node_disk_read_bytes:rate1m{{{NODES}}}",
            "{{node}} {{device}} read",
            "A",
        ),
        p.query(
            f"node:ugro_node_disk_written_bytes:rate1m{{{NODES}}}",
            "{{node}} {{device}} written",
            "B",
        ),
        minimum=0,
    )


def network():
    return p.graph(
        "Network",
        "Bytes received and sent per second over the last minute, per interface (loopback and "
        "container plumbing left out).",
        p.BYTES_PER_SECOND,
        p.query(
            f"node:ugro_node_network_receive_bytes:rate1m{{{NODES}}}",
            "{{node}} {{interface}} in",
            "A",
        ),
        p.query(
            f"node:ugro_node_network_transmit_bytes:rate1m{{{NODES}}}",
            "{{node}} {{interface}} out",
            "B",
        ),
        minimum=0,
    )


# -- the exporters -------------------------------------------------------------------------


def collectors_up():
    return p.states(
        "Collectors",
        "Whether each node's GPU and host collectors can read their source. A GPU collector "
        "down on a GPU node means no NVML, no driver or no permission.",
        p.query(f"ugro_exporter_collector_up{{{NODES}}}", "{{node}} {{collector}}"),
        ok="up",
        bad="down",
        bad_value=0,
    )


def collector_timing():
    return p.graph(
        "Collector time per scrape",
        "Time each collector took for its part of the last scrape, and the age of the "
        "background poller's readings (growing without bound: the poller is stuck).",
        p.SECONDS,
        p.query(
            f"ugro_exporter_collector_scrape_duration_seconds{{{NODES}}}",
            "{{node}} {{collector}} scrape",
            "A",
        ),
        p.query(f"ugro_exporter_poll_age_seconds{{{NODES}}}", "{{node}} poll age", "B"),
        minimum=0,
        width=12,
    )


def dashboard(thresholds: Thresholds) -> dash.Dashboard:
    board = (
        dash.Dashboard("ugro · cluster health")
        .uid(UID)
        .description("Every node and GPU: utilisation, health, errors, host resources.")
        .tags(["ugro", "cluster"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .readonly()
        .with_variable(p.datasource_variable())
        .with_variable(
            p.label_variable(
                "node",
                "Node",
                "ugro_node_info",
                multi=True,
                description="Nodes running ugro-exporter.",
            )
        )
        .annotation(
            p.alert_annotation(
                "Alerts",
                f'ALERTS{{alertstate="firing", {NODES}}}',
                "Alerts on the chosen nodes: a region while each fires.",
            )
        )
        .link(p.dashboard_link("Training job", "ugro-training"))
    )
    rows = [
        (
            dash.Row("Overview"),
            [
                nodes_up().span(3),
                gpus_up().span(3),
                gpus_lost().span(3),
                node_alerts().span(3),
                health_scores().height(4),
            ],
        ),
        (
            dash.Row("GPUs"),
            [
                gpu_utilization(),
                gpu_activity(),
                gpu_interconnect(),
                gpu_memory(thresholds),
                gpu_temperature(thresholds),
                gpu_power(),
                gpu_sm_clock(),
                gpu_throttling(),
                ecc_errors(),
                xid_errors(),
                pcie_replays(),
            ],
        ),
        (
            dash.Row("Hosts"),
            [
                cpu_utilization(thresholds),
                load_per_cpu(),
                memory_used(),
                disk_free(thresholds),
                disk_io(),
                network(),
            ],
        ),
        (dash.Row("Exporters"), [collectors_up(), collector_timing()]),
    ]
    return p.numbered(rows, board)
