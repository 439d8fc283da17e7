"""On a machine with NVIDIA GPUs: does ugro-exporter read what nvidia-smi reads?

Takes one ``ugro-exporter --once`` scrape through the real NVML binding and one
``nvidia-smi --query-gpu`` reading right after it, compares every field both report within a
tolerance that allows for the seconds between them (utilisation and power move, identities and
totals must not), and lists the exporter's GPU series that this GPU or driver does not support.
Then it times scrapes of a running exporter with the real NVML (p50/p99, ms).

    python benchmarks/nvml_vs_nvidia_smi.py

The last line printed is one JSON object. Exits 1 when a reading disagrees, 2 without a GPU.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ugro.common.ports import free_port
from ugro.common.processes import wait_until_ready

# nvidia-smi field -> (ugro series, scale from nvidia-smi's unit to ugro's, absolute tolerance)
NUMERIC_FIELDS: dict[str, tuple[str, float, float]] = {
    "utilization.gpu": ("ugro_gpu_utilization_ratio", 0.01, 0.25),
    "utilization.memory": ("ugro_gpu_memory_utilization_ratio", 0.01, 0.25),
    "memory.used": ("ugro_gpu_memory_used_bytes", 2**20, 512 * 2**20),
    "memory.total": ("ugro_gpu_memory_total_bytes", 2**20, 2**20),
    "temperature.gpu": ("ugro_gpu_temperature_celsius", 1.0, 3.0),
    "power.draw": ("ugro_gpu_power_watts", 1.0, 40.0),
    "enforced.power.limit": ("ugro_gpu_power_limit_watts", 1.0, 1.0),
    "clocks.sm": ("ugro_gpu_sm_clock_hertz", 1e6, 300e6),
    "clocks.mem": ("ugro_gpu_memory_clock_hertz", 1e6, 50e6),
    "ecc.errors.corrected.volatile.total": ("ugro_gpu_ecc_errors_total|corrected", 1.0, 0.0),
    "ecc.errors.uncorrected.volatile.total": ("ugro_gpu_ecc_errors_total|uncorrected", 1.0, 0.0),
}
IDENTITY_FIELDS = ("index", "uuid", "name", "pci.bus_id", "driver_version", "pstate")
EXPECTED_GPU_SERIES = (
    "ugro_gpu_utilization_ratio", "ugro_gpu_memory_utilization_ratio",
    "ugro_gpu_memory_used_bytes", "ugro_gpu_memory_total_bytes", "ugro_gpu_temperature_celsius",
    "ugro_gpu_power_watts", "ugro_gpu_power_limit_watts", "ugro_gpu_sm_clock_hertz",
    "ugro_gpu_memory_clock_hertz", "ugro_gpu_clock_event_active", "ugro_gpu_ecc_errors_total",
    "ugro_gpu_pcie_replays_total", "ugro_gpu_performance_state", "ugro_gpu_compute_processes",
    "ugro_gpu_energy_joules_total", "ugro_gpu_pcie_throughput_bytes_per_second",
)  # fmt: skip


def exporter_once() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ugro.exporter", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def nvidia_smi() -> list[dict[str, str]]:
    fields = [*IDENTITY_FIELDS, *NUMERIC_FIELDS]
    output = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [dict(zip(fields, (v.strip() for v in line.split(",")), strict=True))
            for line in output.strip().splitlines()]  # fmt: skip


def gpu_samples(exposition: str) -> dict[tuple[str, str], float]:
    """{(series, gpu index): value}; ECC series keyed as name|type."""
    samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if "gpu" not in sample.labels:
                continue
            name = sample.name
            if "type" in sample.labels:
                name = f"{name}|{sample.labels['type']}"
            samples[(name, sample.labels["gpu"])] = sample.value
    return samples


def compare(exposition: str, smi: list[dict[str, str]]) -> tuple[list[dict], list[str]]:
    samples = gpu_samples(exposition)
    info = {
        s.labels["gpu"]: s.labels
        for f in text_string_to_metric_families(exposition)
        for s in f.samples
        if s.name == "ugro_gpu_info"
    }
    rows, problems = [], []
    for gpu in smi:
        index = gpu["index"]
        labels = info.get(index, {})
        for field, ours in (
            ("uuid", labels.get("gpu_uuid")),
            ("name", labels.get("name")),
            ("pci.bus_id", labels.get("pci_bus_id")),
            ("driver_version", labels.get("driver_version")),
            ("pstate", "P" + str(int(samples.get(("ugro_gpu_performance_state", index), -1)))),
        ):
            ok = ours == gpu[field]
            rows.append({"gpu": index, "field": field, "nvidia_smi": gpu[field], "ugro": ours,
                         "ok": ok})  # fmt: skip
            if not ok:
                problems.append(f"GPU {index} {field}: nvidia-smi {gpu[field]!r}, ugro {ours!r}")
        for field, (series, scale, tolerance) in NUMERIC_FIELDS.items():
            raw = gpu[field]
            ours = samples.get((series, index))
            if raw in ("[N/A]", "[Not Supported]", "N/A"):
                rows.append({"gpu": index, "field": field, "nvidia_smi": raw, "ugro": ours,
                             "ok": ours is None})  # fmt: skip
                continue
            expected = float(raw) * scale
            ok = ours is not None and abs(ours - expected) <= tolerance
            rows.append({"gpu": index, "field": field, "nvidia_smi": expected, "ugro": ours,
                         "ok": ok})  # fmt: skip
            if not ok:
                problems.append(f"GPU {index} {field}: nvidia-smi {expected}, ugro {ours}")
    return rows, problems


def scrape_latency(scrapes: int = 300) -> dict[str, float]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}"],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_until_ready(
            url, 10, process=process, what="ugro-exporter", interval=0.05, probe_timeout=2
        )
        latencies = []
        for _ in range(scrapes):
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
            latencies.append((time.perf_counter() - started) * 1e3)
    finally:
        process.terminate()
        process.wait(timeout=10)
    percentiles = statistics.quantiles(latencies, n=100)
    return {
        "real_nvml_p50_ms": round(percentiles[49], 3),
        "real_nvml_p99_ms": round(percentiles[98], 3),
    }


def main() -> int:
    if shutil.which("nvidia-smi") is None:
        print(
            "nvml_vs_nvidia_smi: no nvidia-smi on this machine: needs an NVIDIA GPU",
            file=sys.stderr,
        )
        return 2
    exposition = exporter_once()
    smi = nvidia_smi()
    rows, problems = compare(exposition, smi)
    present = {name.split("|")[0] for name, _ in gpu_samples(exposition)}
    unsupported = sorted(set(EXPECTED_GPU_SERIES) - present)
    for row in rows:
        print(f"GPU {row['gpu']} {row['field']:<40} nvidia-smi {row['nvidia_smi']!s:<24} "
              f"ugro {row['ugro']!s:<24} {'ok' if row['ok'] else 'MISMATCH'}")  # fmt: skip
    print("not supported here:", ", ".join(unsupported) or "none")
    result = {
        "benchmark": "nvml_vs_nvidia_smi",
        "gpus": len(smi),
        "gpu_name": smi[0]["name"] if smi else None,
        "fields_compared": len(rows),
        "mismatches": problems,
        "unsupported_series": unsupported,
        **scrape_latency(),
    }
    print(json.dumps(result))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
