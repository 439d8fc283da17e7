"""``ugro-exporter``: one small daemon per node serving GPU and host health on ``/metrics``."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import pathlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

# The exporter imports no other part of ugro than these modules of ugro.common.
from ugro.common.metrics_endpoint import serve_registry
from ugro.common.ports import DEFAULT_EXPORTER_PORT, host_port
from ugro.common.web_config import WebConfig, WebConfigError, load_web_config

from .gpu import GpuCollector
from .health import HealthCollector, TimedCollector
from .host import HostCollector
from .nvml import Nvml, NvmlUnavailable, load_module
from .scheduler_jobs import GpuJobCollector

DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_EXPORTER_PORT}"
EXIT_USAGE = 2
_ONCE_CPU_WINDOW_SECONDS = 0.25

log = logging.getLogger("ugro.exporter")


class UsageError(Exception):
    """A flag value that cannot be used; the message names it and what was expected."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), not usage text plus error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


def parse_listen(value: str) -> ListenAddress:
    """``ADDR:PORT`` or ``[IPv6]:PORT``; ADDR may be empty (all interfaces)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise UsageError(f"--listen {value!r}: expected ADDR:PORT, e.g. {DEFAULT_LISTEN}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"--listen {value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise UsageError(
            f"--listen {value!r}: write IPv6 addresses in brackets, "
            f"e.g. [::1]:{DEFAULT_EXPORTER_PORT}"
        )
    # isdigit() alone accepts "²" (which int() refuses) and "٣٠٠٠١" (which int() reads as 30001).
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {value!r}: expected a port number 0..65535 after the colon")
    return ListenAddress(host or "0.0.0.0", int(port_text))


def parse_mounts(value: str | None) -> list[str] | None:
    """``--mounts /,/data`` as a list; None (every real filesystem) when not given."""
    return [m for m in value.split(",") if m] if value else None


def parse_gpu_jobs_dir(value: str | None) -> pathlib.Path | None:
    """``--gpu-jobs-dir``: a readable directory, or a path where the prolog can create one."""
    if value is None:
        return None
    expected = "expected the directory the Slurm prolog writes (its UGRO_GPU_JOBS_DIR)"
    if not value:
        raise UsageError(f"--gpu-jobs-dir '': {expected}")
    path = pathlib.Path(value)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise UsageError(f"--gpu-jobs-dir {value!r}: {existing} is not a directory; {expected}")
    if existing == path and not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"--gpu-jobs-dir {value!r}: cannot list this directory (permissions)")
    return path


def load_web_config_flag(value: str | None) -> WebConfig | None:
    """``--web.config.file``: a usable web configuration, or None (plain HTTP)."""
    if value is None:
        return None
    if not value:
        raise UsageError("--web.config.file '': expected the path of a web configuration file")
    try:
        return load_web_config(value)
    except WebConfigError as error:
        raise UsageError(f"--web.config.file: {error}") from None


def _security(web_config: WebConfig | None) -> str:
    if web_config is None:
        return ""
    parts = []
    if web_config.tls is not None:
        parts.append(f"client certificates: {web_config.tls.client_auth_type}")
    if web_config.basic_auth_users:
        parts.append(f"basic auth: {len(web_config.basic_auth_users)} user(s)")
    return f" ({'; '.join(parts)})" if parts else ""


def positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value!r}: expected 0.1 to 3600 seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="ugro-exporter",
        description="Serve this node's GPU (NVML) and host (psutil) health on /metrics.",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR:PORT",
        help=f"where to serve /metrics (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        help="TLS, client certificates and basic auth for /metrics, in the format of "
        "Prometheus's --web.config.file (check it with `promtool check web-config FILE`); "
        "plain HTTP without it",
    )
    parser.add_argument(
        "--node",
        default=socket.gethostname(),
        help="this node's name in logs and ugro_node_info (default: the host name)",
    )
    parser.add_argument(
        "--poll-interval",
        type=positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how often slow readings (PCIe throughput, energy, CPU use) are taken (default 5)",
    )
    parser.add_argument(
        "--mounts",
        metavar="PATH[,PATH...]",
        help="mount points to report as disks (default: every device-backed filesystem)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    parser.add_argument(
        "--once", action="store_true", help="print one scrape to standard output and exit"
    )
    parser.add_argument(
        "--nvlink-per-link",
        action="store_true",
        help="also serve NVLink throughput per link (2 series per link and GPU: 36 on an H100)",
    )
    parser.add_argument(
        "--tensor-pipes",
        action="store_true",
        help="also serve the tensor pipes by kind (HMMA, DFMA, IMMA; GPM GPUs only)",
    )
    parser.add_argument(
        "--gpu-jobs-dir",
        metavar="DIR",
        help="serve ugro_gpu_scheduler_job_info (GPU -> scheduler job, user) from the files "
        "that ugro's Slurm prolog (ugro/exporter/slurm/prolog.sh) writes in DIR "
        "(off by default; the prolog writes /run/ugro/gpu-jobs unless told otherwise)",
    )
    parser.add_argument(
        "--nvml-module",
        default="pynvml",
        metavar="MODULE[:FACTORY]",
        help="the NVML binding to use (default pynvml); tests pass a scripted double",
    )
    return parser


class Exporter:
    """The collectors, their registry and the background poller, without the HTTP server."""

    def __init__(
        self,
        *,
        node: str,
        gpu: GpuCollector,
        host: HostCollector,
        poll_interval: float,
        gpu_jobs: GpuJobCollector | None = None,
    ) -> None:
        self.node = node
        self.gpu = gpu
        self.host = host
        # Without --gpu-jobs-dir the family is still declared (no samples, no health series),
        # so that a node's exposition names the same families whatever its options.
        self.gpu_jobs = gpu_jobs or GpuJobCollector(None)
        self.poll_interval = poll_interval
        self.registry = CollectorRegistry()
        self.registry.register(NodeInfoCollector(node))
        self.registry.register(TimedCollector(host))
        self.registry.register(TimedCollector(gpu))
        self.registry.register(TimedCollector(self.gpu_jobs))
        healths = [host.health, gpu.health]
        if self.gpu_jobs.enabled:
            healths.append(self.gpu_jobs.health)
        self.registry.register(HealthCollector(healths))
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def poll_once(self) -> None:
        for collector in (self.host, self.gpu):
            try:
                collector.poll()
            except Exception as error:  # a failing poll is counted; the poller keeps going
                collector.health.record_error("poll", error)

    def start_polling(self) -> None:
        self.poll_once()
        self._poller = threading.Thread(target=self._poll_forever, name="ugro-poller", daemon=True)
        self._poller.start()

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.poll_once()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=2)
        self.gpu.close()


class NodeInfoCollector:
    """``ugro_node_info{node}``: the node name this exporter was given."""

    def __init__(self, node: str) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "ugro_node_info", "The name this exporter gives its node (value 1).", labels=["node"]
        )
        info.add_metric([self._node], 1)
        yield info


def build_exporter(args: argparse.Namespace) -> Exporter:
    try:
        nvml: Nvml | None = Nvml(load_module(args.nvml_module))
        unavailable = None
    except NvmlUnavailable as error:
        nvml, unavailable = None, error
    return Exporter(
        node=args.node,
        gpu=GpuCollector(
            nvml,
            unavailable,
            nvlink_per_link=args.nvlink_per_link,
            tensor_pipes=args.tensor_pipes,
        ),
        host=HostCollector(mountpoints=parse_mounts(args.mounts)),
        poll_interval=args.poll_interval,
        gpu_jobs=GpuJobCollector(parse_gpu_jobs_dir(args.gpu_jobs_dir)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        listen = parse_listen(args.listen)
        if not args.node or any(ch.isspace() for ch in args.node):
            raise UsageError(f"--node {args.node!r}: expected a name without spaces")
        for mount in parse_mounts(args.mounts) or []:
            if not os.path.ismount(mount):
                raise UsageError(f"--mounts: {mount!r} is not a mount point on this host")
        parse_gpu_jobs_dir(args.gpu_jobs_dir)
        web_config = load_web_config_flag(args.web_config_file)  # checked for --once too
    except UsageError as error:
        print(f"ugro-exporter: {error}", file=sys.stderr)
        return EXIT_USAGE

    exporter = build_exporter(args)
    if args.once:
        exporter.poll_once()
        time.sleep(_ONCE_CPU_WINDOW_SECONDS)  # a second poll gives CPU use over this window
        exporter.poll_once()
        sys.stdout.write(generate_latest(exporter.registry).decode())
        exporter.close()
        return 0

    try:
        endpoint = serve_registry(exporter.registry, listen.host, listen.port, web_config)
    except OSError as error:
        exporter.close()
        reason = error.strerror or str(error)
        print(
            f"ugro-exporter: cannot listen on {listen}: {reason} "
            "(is another exporter running? choose another --listen)",
            file=sys.stderr,
        )
        return EXIT_USAGE

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _set_event(stop))
    exporter.start_polling()
    log.info(
        "serving node %s on %s://%s/metrics%s (GPU collector %s)",
        args.node,
        endpoint.scheme,
        ListenAddress(listen.host, endpoint.port),
        _security(web_config),
        "up" if exporter.gpu.health.up else f"down: {exporter.gpu.health.down_reason}",
    )
    gpu_jobs_dir = exporter.gpu_jobs.directory
    if gpu_jobs_dir is not None and not gpu_jobs_dir.exists():
        log.info("%s does not exist yet: the Slurm prolog creates it for the first GPU job",
                 gpu_jobs_dir)  # fmt: skip
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
    endpoint.close()
    exporter.close()
    return 0


def _set_event(event: threading.Event) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        event.set()

    return handler


if __name__ == "__main__":
    sys.exit(main())
