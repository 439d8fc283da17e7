"""``ugro-exporter`` as a process: bad input, --once, and a running daemon scraped over HTTP."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from ..support import sample, sample_values, scrape, wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]
FAKE = "tests.exporter.fake_nvml:from_environment"


def exporter_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UGRO_FAKE_NVML")}
    env["PYTHONPATH"] = str(REPO)  # so the scripted NVML double is importable
    env.update(extra)
    return env


def run_exporter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ugro.exporter", *args],
        env=env or exporter_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--listen", "9490"], "--listen '9490': expected ADDR:PORT"),
        (["--listen", "127.0.0.1:http"], "expected a port number 0..65535"),
        (["--listen", "127.0.0.1:70000"], "expected a port number 0..65535"),
        # Digits to str.isdigit() but not ASCII: int() refuses the first and reads the second
        # as 30001. --once, so that a port taken as valid ends the run instead of serving.
        (["--listen", "127.0.0.1:²", "--once"], "--listen '127.0.0.1:²': expected a port"),
        (["--listen", "127.0.0.1:٣٠٠٠١", "--once"], "--listen '127.0.0.1:٣٠٠٠١': expected a port"),
        (["--listen", "::1:9490"], "write IPv6 addresses in brackets"),
        (["--listen", "[nope]:9490"], "'nope' is not an IPv6 address"),
        (["--poll-interval", "0"], "expected 0.1 to 3600 seconds"),
        (["--node", "two words"], "--node 'two words'"),
        (["--mounts", "/,/no/such/mount"], "--mounts: '/no/such/mount' is not a mount point"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, expected):
    result = run_exporter(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert result.stdout == ""


def test_a_port_in_use_is_one_line_and_exit_code_2():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_exporter("--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2
    [line] = [line for line in result.stderr.splitlines() if "ugro-exporter:" in line]
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line
    assert "Traceback" not in result.stderr


def test_once_with_the_real_nvml_binding_serves_host_metrics_and_says_why_gpus_are_missing(
    promtool,
):
    result = run_exporter("--once", "--node", "n1")
    assert result.returncode == 0, result.stderr
    samples = sample_values(result.stdout)
    assert sample(samples, "ugro_node_info", node="n1") == 1
    assert sample(samples, "ugro_node_memory_total_bytes") > 0
    assert sample(samples, "ugro_node_cpu_utilization_ratio") is not None
    if sample(samples, "ugro_exporter_collector_up", collector="gpu") == 0:
        reasons = [labels for (name, labels) in samples if name.endswith("down_reason")]
        assert reasons, "a down GPU collector must say why"
        assert "gpu collector is down" in result.stderr
    check = promtool(result.stdout)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout


def test_the_exporter_never_imports_torch():
    code = (
        "import sys; from ugro.exporter.cli import main; main(['--once']); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=exporter_env(), capture_output=True, timeout=60
    )
    assert result.returncode == 0


def test_running_daemon_survives_a_lost_gpu_and_counts_xids(
    tmp_path, start_process, free_port_block, promtool
):
    port = free_port_block(1)
    process = start_process(
        [
            sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}",
            "--node", "gpu-node-1", "--poll-interval", "0.5", "--nvml-module", FAKE,
        ],
        exporter_env(UGRO_FAKE_NVML_CONTROL=str(tmp_path), UGRO_FAKE_NVML_GPUS="8"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    first = wait_for(
        lambda: "ugro_gpu_energy_joules_total" in (text := scrape(url)) and text, 30, "a scrape"
    )
    check = promtool(first)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout
    samples = sample_values(first)
    assert sample(samples, "ugro_node_gpus") == 8
    assert sample(samples, "ugro_exporter_collector_up", collector="gpu") == 1
    assert sample(samples, "ugro_exporter_collector_up", collector="host") == 1

    lost_uuid = "GPU-00000003-1111-2222-3333-444455556666"
    (tmp_path / "lost").write_text("3\n")
    (tmp_path / "xid").write_text("5 79\n")
    wait_for(
        lambda: sample(sample_values(scrape(url)), "ugro_gpu_up", gpu="3", gpu_uuid=lost_uuid) == 0,
        30,
        "GPU 3 reported lost",
    )
    wait_for(lambda: 'xid="79"' in scrape(url), 30, "the XID counted")
    later = sample_values(scrape(url))
    assert sample(later, "ugro_gpu_up", gpu="4", gpu_uuid=lost_uuid.replace("03", "04")) == 1
    assert (
        sample(later, "ugro_gpu_xid_errors_total", gpu="5", xid="79",
               gpu_uuid="GPU-00000005-1111-2222-3333-444455556666") == 1
    )  # fmt: skip
    # Host metrics keep flowing while the GPU is lost.
    user_before = sample(samples, "ugro_node_cpu_seconds_total", mode="user")
    assert sample(later, "ugro_node_cpu_seconds_total", mode="user") > user_before
    assert sample(later, "ugro_node_memory_total_bytes") > 0

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    with pytest.raises(OSError):
        scrape(url)


def test_once_serves_gpm_figures_and_the_opt_in_series_on_request(promtool):
    result = run_exporter(
        "--once", "--nvml-module", FAKE, "--tensor-pipes", "--nvlink-per-link",
        env=exporter_env(UGRO_FAKE_NVML_GPUS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    samples = sample_values(result.stdout)
    gpu = {"gpu": "0", "gpu_uuid": "GPU-00000000-1111-2222-3333-444455556666"}
    assert sample(samples, "ugro_gpu_sm_active_ratio", **gpu) == 0.7
    assert sample(samples, "ugro_gpu_pipe_active_ratio", pipe="tensor_hmma", **gpu) == 0.45
    link = {"link": "17", "direction": "rx", **gpu}
    per_link = "ugro_gpu_nvlink_link_throughput_bytes_per_second"
    assert sample(samples, per_link, **link) == 200 * 2**20
    check = promtool(result.stdout)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout
