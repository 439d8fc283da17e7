"""How ugro-launch's own work grows with the number of nodes: 1, 2 and 4 SSH nodes.

Nodes are network namespaces on this machine, each with its own sshd (tests/launcher/netns.py),
so every node costs a real SSH handshake and real remote commands. For each node count, one
rank per node of the reference trainer is launched:

* ``launch_s`` — wall time of the ``ugro-launch run`` command: preflight, exporters, starting
  torchrun, registering targets, all done per node in parallel;
* ``ready_s`` — from the start of that command until every rank's /metrics answers (torchrun's
  rendezvous and PyTorch's import included, which the launcher does not control).

Node counts are measured in rotation (1, 2, 4, 1, 2, 4, ...) for ``--rounds`` rounds and the
medians reported; ``ratio_4_to_1`` is the median launch wall time on 4 nodes over 1 node
(target ≤ 1.5: per-node work must overlap, not queue). Needs root (namespaces).

    python benchmarks/launch_scaling.py --rounds 3      # about 3 minutes on 2 cores

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from ugro.common.ports import DEFAULT_METRICS_BASE_PORT, host_port
from ugro.common.processes import url_answers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.launcher.netns import NamespaceCluster

TRAINER = [
    *("-m", "ugro.trainer.train", "--steps", "1000000"),
    *("--width", "64", "--depth", "1", "--batch-size", "8", "--context", "32"),
]
COUNTS = (1, 2, 4)


def write_inventory(path: pathlib.Path, cluster: NamespaceCluster, count: int) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "defaults": {
                    "python": sys.executable,
                    "workdir": str(path.parent / "nodes"),
                    "user": "root",
                    "identity_file": str(cluster.client_key),
                    "min_free_disk_gb": 0,
                    "env": {"OMP_NUM_THREADS": "1"},
                },
                "prometheus": {"targets_dir": str(path.parent / "targets")},
                "nodes": [{"name": n.name, "host": n.address} for n in cluster.nodes[:count]],
            }
        )
    )


def launcher(workdir: pathlib.Path, cluster: NamespaceCluster, *args: str):
    return subprocess.run(
        [sys.executable, "-m", "ugro.launcher.cli", *args, f"--known-hosts={cluster.known_hosts}"]
        if args[0] == "stop"
        else [sys.executable, "-m", "ugro.launcher.cli", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "UGRO_STATE_DIR": str(workdir / "state")},
        timeout=300,
    )


def one_launch(workdir: pathlib.Path, cluster: NamespaceCluster, count: int, run: int) -> dict:
    inventory = workdir / f"inventory-{count}.yml"
    write_inventory(inventory, cluster, count)
    job_id = f"scale-{count}-{run}"
    started = time.perf_counter()
    result = launcher(
        workdir,
        cluster,
        "run",
        f"--inventory={inventory}",
        f"--known-hosts={cluster.known_hosts}",
        f"--job-id={job_id}",
        "--",
        *TRAINER,
    )
    launch_s = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"launch on {count} node(s) failed:\n{result.stderr}{result.stdout}")
    urls = [
        f"http://{host_port(node.address, DEFAULT_METRICS_BASE_PORT)}/metrics"
        for node in cluster.nodes[:count]
    ]
    while not all(url_answers(url) for url in urls):
        if time.perf_counter() - started > 180:
            raise RuntimeError(f"ranks on {count} node(s) not up after 180 s")
        time.sleep(0.05)
    ready_s = time.perf_counter() - started
    stopped = launcher(workdir, cluster, "stop", job_id)
    if stopped.returncode != 0:
        raise RuntimeError(f"stop failed:\n{stopped.stderr}{stopped.stdout}")
    return {"launch_s": launch_s, "ready_s": ready_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="launches per node count")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected >= 1")

    samples: dict[int, list[dict]] = {count: [] for count in COUNTS}
    with tempfile.TemporaryDirectory(prefix="ugro-launch-scaling-") as directory:
        workdir = pathlib.Path(directory)
        with NamespaceCluster(max(COUNTS), workdir / "cluster") as cluster:
            for run in range(args.rounds):
                for count in COUNTS:
                    sample = one_launch(workdir, cluster, count, run)
                    samples[count].append(sample)
                    print(
                        f"round {run + 1}, {count} node(s): launch {sample['launch_s']:.2f} s, "
                        f"ranks ready {sample['ready_s']:.2f} s",
                        flush=True,
                    )

    figures = {
        f"{count}_nodes": {
            "launch_s": round(statistics.median(s["launch_s"] for s in runs), 2),
            "ready_s": round(statistics.median(s["ready_s"] for s in runs), 2),
        }
        for count, runs in samples.items()
    }
    ratio = figures["4_nodes"]["launch_s"] / figures["1_nodes"]["launch_s"]
    print(
        json.dumps(
            {
                "benchmark": "launch_scaling",
                "rounds": args.rounds,
                "ranks_per_node": 1,
                **figures,
                "ratio_4_to_1": round(ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
