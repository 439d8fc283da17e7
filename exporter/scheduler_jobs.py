"""``ugro_gpu_scheduler_job_info``: which scheduler job, and whose, holds each GPU.

For jobs ugro did not launch (a plain ``sbatch``), nothing publishes ``ugro_train_rank_info``;
the scheduler knows instead. A Slurm prolog (``exporter/slurm/prolog.sh``) writes one file per
GPU the job holds into a directory, named by the GPU's UUID::

    job_id=123
    user=alice

and the epilog removes it. This collector lists that directory at every scrape (a handful of
files of a few bytes) and serves one info series per file, joined in PromQL on ``gpu_uuid``
rather than copied onto every GPU series.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric

from .health import CollectorHealth

log = logging.getLogger("ugro.exporter")

INFO_NAME = "ugro_gpu_scheduler_job_info"
# As NVML names a GPU or a MIG instance; anything else in the directory is not ours.
_UUID_FILE_NAME = re.compile(r"(GPU|MIG)-[0-9A-Za-z-]+")
# A label value the prolog can write: no blanks or control characters, and short.
_VALUE = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")
_MAX_FILE_BYTES = 4096
# Far beyond a node's GPUs (8 GPUs x 7 MIG instances): a wrong directory is not read whole.
_MAX_FILES = 1024


class MalformedGpuJobFile(ValueError):
    """A file in the GPU-jobs directory that is not what prolog.sh writes."""


@dataclass(frozen=True)
class GpuJob:
    gpu_uuid: str
    scheduler_job_id: str
    user: str


def parse_gpu_job_file(gpu_uuid: str, text: str) -> GpuJob:
    """The ``job_id=…``/``user=…`` lines of one file; other keys are ignored."""
    fields: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise MalformedGpuJobFile(f"line {number}: expected KEY=VALUE, got {line[:40]!r}")
        if key in fields:
            raise MalformedGpuJobFile(f"line {number}: {key!r} given twice")
        fields[key] = value
    for key in ("job_id", "user"):
        if key not in fields:
            raise MalformedGpuJobFile(f"no {key}= line")
        if not _VALUE.fullmatch(fields[key]):
            raise MalformedGpuJobFile(
                f"{key}={fields[key][:40]!r}: expected 1 to 128 characters without blanks"
            )
    return GpuJob(gpu_uuid, fields["job_id"], fields["user"])


class GpuJobCollector:
    """Reads the prolog's directory at every scrape; ``None`` serves the family without samples.

    A missing directory means no job has had a GPU here yet (the prolog creates it): no series,
    collector up. A file that cannot be read or parsed is left out and counted once in
    ``ugro_exporter_collector_errors_total{collector="gpu_jobs"}`` (again only if it changes);
    an unreadable directory sets the collector down.
    """

    def __init__(self, directory: pathlib.Path | None) -> None:
        self.directory = directory
        self.health = CollectorHealth("gpu_jobs")
        self._lock = threading.Lock()
        # (name, size, mtime) of files already counted as malformed, so that a bad file left
        # in place counts once, not at every scrape.
        self._reported: set[tuple[str, int, int]] = set()

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            INFO_NAME,
            "The scheduler job holding each GPU, from the Slurm prolog's files (value 1).",
            labels=["gpu_uuid", "scheduler_job_id", "user"],
        )
        for job in self.read():
            info.add_metric([job.gpu_uuid, job.scheduler_job_id, job.user], 1)
        yield info

    def read(self) -> list[GpuJob]:
        """The jobs the directory names now, by GPU UUID."""
        if self.directory is None:
            return []
        try:
            with os.scandir(self.directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except FileNotFoundError:
            self.health.set_up()
            return []
        except OSError as error:
            self.health.set_down("directory_unreadable", f"{self.directory}: {error}")
            return []
        self.health.set_up()
        jobs: list[GpuJob] = []
        seen: set[tuple[str, int, int]] = set()
        for entry in entries:
            if entry.name.startswith("."):
                continue  # the prolog's temporary files and lock
            if len(jobs) + len(seen) >= _MAX_FILES:
                self._report_once(seen, ("", 0, 0), f"more than {_MAX_FILES} files; rest skipped")
                break
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed by an epilog since the listing
            key = (entry.name, info.st_size, info.st_mtime_ns)
            try:
                jobs.append(self._read_one(entry, info))
            except FileNotFoundError:
                continue  # removed between the stat and the open
            except (OSError, UnicodeDecodeError, MalformedGpuJobFile) as error:
                self._report_once(seen, key, f"{entry.path}: {error}")
        with self._lock:
            self._reported &= seen  # forget files that were fixed or removed
        return jobs

    def _read_one(self, entry: os.DirEntry, info: os.stat_result) -> GpuJob:
        if not _UUID_FILE_NAME.fullmatch(entry.name):
            raise MalformedGpuJobFile("not named by a GPU UUID (GPU-… or MIG-…)")
        if not stat.S_ISREG(info.st_mode):
            raise MalformedGpuJobFile("not a regular file")
        if info.st_size > _MAX_FILE_BYTES:
            raise MalformedGpuJobFile(f"{info.st_size} bytes, more than {_MAX_FILE_BYTES}")
        # O_NOFOLLOW: a link put in place of the file since the stat is not followed.
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as file:
            text = file.read(_MAX_FILE_BYTES + 1).decode("utf-8")
        return parse_gpu_job_file(entry.name, text)

    def _report_once(
        self, seen: set[tuple[str, int, int]], key: tuple[str, int, int], what: str
    ) -> None:
        seen.add(key)
        with self._lock:
            if key in self._reported:
                return
            self._reported.add(key)
        self.health.record_error("read", MalformedGpuJobFile(what))
