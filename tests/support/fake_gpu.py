"""A node exporter that reads scripted GPUs (tests/exporter/fake_nvml.py), not NVML."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

from tests.support.stack import AlertStack
from ugro.common.ports import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


# The scripted NVML double's GPUs, by index: what a rank names in UGRO_GPU_UUIDS to be joined
# with the exporter's readings of that GPU.
FAKE_GPU_UUIDS = [f"GPU-{i:08x}-1111-2222-3333-444455556666" for i in range(8)]


@contextlib.contextmanager
def fake_gpu_exporter(
    stack: AlertStack,
    node: str = "node-a",
    gpus: int = 2,
    control_dir: pathlib.Path | None = None,
) -> Iterator[subprocess.Popen]:
    """The node's ugro-exporter with ``gpus`` scripted H100s, registered as ugro-launch
    registers it. ``control_dir`` lets a test inject XIDs or lost GPUs (fake_nvml.py).

    Every one of these H100s has GPM, so the profiling series (``ugro_gpu_sm_active_ratio``,
    NVLink throughput, ...) are served from the second poll on, a poll interval (1 s) after
    start; GPUs without GPM are covered by the exporter's unit tests."""
    port = free_port()
    env = {**os.environ, "UGRO_FAKE_NVML_GPUS": str(gpus)}
    if control_dir is not None:
        env["UGRO_FAKE_NVML_CONTROL"] = str(control_dir)
    with open(stack.workdir / f"exporter-{node}.log", "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ugro.exporter",
                f"--listen=127.0.0.1:{port}",
                f"--node={node}",
                "--poll-interval=1",
                "--nvml-module=tests.exporter.fake_nvml:from_environment",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            stack.targets.register_node(node, "127.0.0.1", port)
            yield process
        finally:
            process.terminate()
            process.wait(timeout=10)
