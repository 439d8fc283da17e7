"""One worker process of benchmarks/scale.py: whole simulated nodes, each with 8 training ranks
and its node exporter, every one on its own loopback port.

Each rank is a real ``Telemetry`` (``serve=False``: its registry is served here), driven through
the API a training loop calls: the phases of a step (data, forward, backward, optimizer), then
``step()`` with a decaying, noisy loss, a gradient norm, a warm-up-then-cosine learning rate,
tokens and samples; a checkpoint every ``--checkpoint-every`` steps. The ranks of one job step
in lockstep, as under synchronous DDP; one rank of the job (``--straggler``) waits longer for
its input. Each node's exporter is the real ``Exporter`` with ``GpuCollector`` over the
scripted NVML double (8 H100s with UUIDs unique to the node, whose readings drift every poll)
and the real ``HostCollector``.

The text each endpoint serves is ``prometheus_client.generate_latest`` of its registry, as in
production; only the HTTP transport differs: one asyncio loop per worker answers every port
(plain text, no gzip), where a real rank or exporter runs a threaded HTTP server of its own.

    python benchmarks/scale_sim.py --job-id J --world-size 1024 --first-node 0 --nodes 32

prints one JSON line, ``{"ranks": [[rank, node, port], ...], "nodes": [[node, port], ...]}``,
once every port listens, then runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import pathlib
import random
import signal
import sys
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

# tests/ is importable only from the repository root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.exporter.fake_nvml import FakeNvml, h100s
from ugro.exporter.cli import Exporter
from ugro.exporter.gpu import GpuCollector
from ugro.exporter.host import HostCollector
from ugro.exporter.nvml import Nvml
from ugro.trainer.telemetry import Telemetry

GPUS_PER_NODE = 8
# A 7B-parameter model: 6 * 7e9 training FLOPs per token, 8 sequences of 1,024 tokens per rank
# and step; the H100's dense BF16 peak. With a 1 s step that is an MFU of about 0.35.
FLOPS_PER_TOKEN = 6 * 7e9
PEAK_FLOPS = 989e12
SEQUENCES_PER_STEP = 8
TOKENS_PER_SEQUENCE = 1024
TOTAL_STEPS = 100_000
# Shares of a step spent in each phase; the straggler's input wait comes on top.
PHASE_SHARES = (("data", 0.05), ("forward", 0.3), ("backward", 0.5), ("optimizer", 0.15))
STRAGGLER_EXTRA_DATA_SHARE = 0.4
CHECKPOINT_SECONDS = 2.0
CHECKPOINT_BYTES = 14 * 10**9 // 8  # a 7B model's bf16 weights, sharded over a node's 8 ranks
EXPORTER_POLL_SECONDS = 5.0  # ugro-exporter's default --poll-interval
XID_AFTER_POLLS = 12
XID_CODE = 13  # graphics engine exception: an application fault, not a lost GPU

log = logging.getLogger("ugro.benchmarks.scale_sim")


def node_name(index: int) -> str:
    return f"node-{index:04d}"


def gpu_uuid(node_index: int, local_rank: int) -> str:
    return f"GPU-{node_index:08x}-{local_rank:04x}-2222-3333-444455556666"


class MetricsProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, enough for Prometheus's GET /metrics: every request is
    answered with the registry's exposition text."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            request_line = head.split(b"\r\n", 1)[0]
            if request_line.startswith(b"GET "):
                body = generate_latest(self.registry)
                status = b"200 OK"
                content_type = CONTENT_TYPE_LATEST.encode()
            else:
                body, status, content_type = b"GET only\n", b"405 Method Not Allowed", b"text/plain"
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: "
                + content_type
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )


class SimulatedNode:
    """A node's exporter over 8 scripted H100s, and its 8 ranks' telemetry."""

    def __init__(self, args: argparse.Namespace, index: int) -> None:
        self.index = index
        self.name = node_name(index)
        self.gpus = h100s(GPUS_PER_NODE)
        for local_rank, gpu in enumerate(self.gpus):
            gpu.uuid = gpu_uuid(index, local_rank)
        self.nvml = FakeNvml(self.gpus)
        self.exporter = Exporter(
            node=self.name,
            gpu=GpuCollector(Nvml(self.nvml)),
            host=HostCollector(),
            poll_interval=EXPORTER_POLL_SECONDS,
        )
        self.ranks: list[tuple[int, Telemetry]] = []
        for local_rank in range(GPUS_PER_NODE):
            rank = index * GPUS_PER_NODE + local_rank
            telemetry = Telemetry(
                job_id=args.job_id,
                rank=rank,
                local_rank=local_rank,
                world_size=args.world_size,
                node=self.name,
                total_steps=TOTAL_STEPS,
                gpu_uuid=gpu_uuid(index, local_rank),
                flops_per_token=FLOPS_PER_TOKEN,
                peak_flops=PEAK_FLOPS,
                serve=False,
                env={},  # identity from the arguments only, never this process's environment
            )
            self.ranks.append((rank, telemetry))

    def drift_gpus(self, rng: random.Random, elapsed: float, seconds: float) -> None:
        """New readings for the next poll and scrape: busy GPUs that warm up and draw power."""
        for gpu in self.gpus:
            gpu.utilization_gpu = min(100, max(0, int(rng.gauss(88, 4))))
            gpu.utilization_memory = min(100, max(0, int(rng.gauss(45, 5))))
            gpu.temperature = int(55 + 15 * (1 - math.exp(-elapsed / 120)) + rng.gauss(0, 1))
            gpu.power_mw = int(rng.gauss(620_000, 25_000))
            gpu.energy_mj += int(gpu.power_mw * seconds)
            gpu.memory_used = int((60 + rng.random()) * 1024**3)
            gpu.sm_clock_mhz = 1980 if rng.random() > 0.02 else 1755

    def close(self) -> None:
        self.exporter.close()
        for _, telemetry in self.ranks:
            telemetry.close()


class Job:
    """The worker's share of one training job, stepping in lockstep."""

    def __init__(self, args: argparse.Namespace, nodes: list[SimulatedNode]) -> None:
        self.args = args
        self.nodes = nodes
        self.rng = random.Random(args.seed)
        self.telemetry = [t for node in nodes for _, t in node.ranks]
        self.rank_of = {id(t): r for node in nodes for r, t in node.ranks}
        self.straggler = [t for t in self.telemetry if self.rank_of[id(t)] == args.straggler]
        self.started = time.monotonic()

    def learning_rate(self, step: int) -> float:
        peak, warmup = 3e-4, 200
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (TOTAL_STEPS - warmup))
        return peak * 0.5 * (1 + math.cos(math.pi * progress))

    async def run(self) -> None:
        step_seconds = self.args.step_seconds
        step = 0
        while True:
            for name, share in PHASE_SHARES:
                for telemetry in self.telemetry:
                    if name != "forward" or telemetry not in self.straggler:
                        telemetry.mark(name)
                if name == "data" and self.straggler:
                    # The straggler is still reading input while the others compute.
                    await asyncio.sleep(step_seconds * STRAGGLER_EXTRA_DATA_SHARE)
                    for telemetry in self.straggler:
                        telemetry.mark("forward")
                await asyncio.sleep(step_seconds * share)
            base_loss = 1.9 + 6.0 * math.exp(-step / 400)
            for telemetry in self.telemetry:
                telemetry.step(
                    loss=base_loss + self.rng.gauss(0, 0.05),
                    grad_norm=0.4 + 2.0 / (1 + step / 100) + abs(self.rng.gauss(0, 0.1)),
                    learning_rate=self.learning_rate(step),
                    tokens=SEQUENCES_PER_STEP * TOKENS_PER_SEQUENCE,
                    samples=SEQUENCES_PER_STEP,
                )
            step += 1
            if self.args.checkpoint_every and step % self.args.checkpoint_every == 0:
                with contextlib.ExitStack() as blocks:
                    for telemetry in self.telemetry:
                        blocks.enter_context(telemetry.checkpoint(CHECKPOINT_BYTES))
                    await asyncio.sleep(CHECKPOINT_SECONDS)


async def poll_exporters(nodes: list[SimulatedNode], rng: random.Random) -> None:
    """Each exporter's background poll every 5 s, spread over the interval, after its GPUs'
    readings drift: what each real exporter's poller thread does."""
    started = time.monotonic()
    for node in nodes:
        node.drift_gpus(rng, 0.0, 0.0)
        node.exporter.poll_once()
    gap = EXPORTER_POLL_SECONDS / max(1, len(nodes))
    for polls in itertools.count(1):
        if polls == XID_AFTER_POLLS and nodes[0].index == 0:
            # One GPU of the first node reports an XID, as a busy cluster's GPUs now and then do.
            nodes[0].nvml.inject_xid(0, XID_CODE)
        for node in nodes:
            await asyncio.sleep(gap)
            node.drift_gpus(rng, time.monotonic() - started, EXPORTER_POLL_SECONDS)
            node.exporter.poll_once()


async def serve(args: argparse.Namespace) -> None:
    nodes = [SimulatedNode(args, i) for i in range(args.first_node, args.first_node + args.nodes)]
    loop = asyncio.get_running_loop()
    servers = []
    ranks, exporters = [], []
    for node in nodes:
        server = await loop.create_server(
            lambda node=node: MetricsProtocol(node.exporter.registry), "127.0.0.1", 0
        )
        servers.append(server)
        exporters.append([node.name, server.sockets[0].getsockname()[1]])
        for rank, telemetry in node.ranks:
            server = await loop.create_server(
                lambda telemetry=telemetry: MetricsProtocol(telemetry.registry), "127.0.0.1", 0
            )
            servers.append(server)
            ranks.append([rank, node.name, server.sockets[0].getsockname()[1]])
    print(json.dumps({"ranks": ranks, "nodes": exporters}), flush=True)

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [
        asyncio.create_task(Job(args, nodes).run()),
        asyncio.create_task(poll_exporters(nodes, random.Random(args.seed + 1))),
    ]
    await stop.wait()
    for task in tasks:
        task.cancel()
    for server in servers:
        server.close()
    for node in nodes:
        node.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--first-node", type=int, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--step-seconds", type=float, default=1.0)
    parser.add_argument("--checkpoint-every", type=int, default=120, help="steps (0: never)")
    parser.add_argument("--straggler", type=int, default=3, help="the rank that waits longer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.nodes < 1 or args.first_node < 0 or args.step_seconds <= 0:
        parser.error("expected --nodes >= 1, --first-node >= 0 and --step-seconds > 0")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
