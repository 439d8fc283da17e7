"""Each collector's own health, so "no data" and "broken collector" look different in PromQL."""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("ugro.exporter")

_ERROR_LOG_FIRST = 5
_ERROR_LOG_EVERY = 1000


class CollectorHealth:
    """Up/down (with a fixed reason code), error count and last collection time of a collector."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.down_reason: str | None = None
        self.errors = 0
        self.last_duration: float | None = None
        # time.monotonic() of the last background poll, for collectors that poll
        self.polled_at: float | None = None

    @property
    def up(self) -> bool:
        return self.down_reason is None

    def set_down(self, reason: str, message: str) -> None:
        with self._lock:
            changed = self.down_reason != reason
            self.down_reason = reason
        if changed:
            log.warning("%s collector is down (%s): %s", self.name, reason, message)

    def set_up(self) -> None:
        with self._lock:
            was_down = self.down_reason is not None
            self.down_reason = None
        if was_down:
            log.info("%s collector is up", self.name)

    def record_error(self, where: str, error: BaseException) -> None:
        """Count a failure the collector survived; logged, but not every time."""
        with self._lock:
            self.errors += 1
            count = self.errors
        if count <= _ERROR_LOG_FIRST or count % _ERROR_LOG_EVERY == 0:
            log.warning(
                "%s collector error #%d in %s: %s: %s",
                self.name, count, where, type(error).__name__, error,
            )  # fmt: skip


class Collector(Protocol):
    health: CollectorHealth

    def collect(self) -> Iterable[Metric]: ...


class TimedCollector:
    """Runs one collector per scrape, timing it and keeping its failure out of the scrape."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def collect(self) -> Iterator[Metric]:
        health = self._collector.health
        started = time.perf_counter()
        try:
            families = list(self._collector.collect())
        except Exception as error:  # one broken collector must not fail the whole scrape
            health.record_error("collect", error)
            families = []
        health.last_duration = time.perf_counter() - started
        yield from families


def exporter_version() -> str:
    try:
        return metadata.version("ugro")
    except metadata.PackageNotFoundError:
        return "unknown"


class HealthCollector:
    """Publishes every collector's health and the build info; register it after the others."""

    def __init__(self, healths: Iterable[CollectorHealth]) -> None:
        self._healths = list(healths)
        self._version = exporter_version()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ugro_exporter_collector_up",
            "1 when the collector can read its source, 0 when it is down.",
            labels=["collector"],
        )
        reason = GaugeMetricFamily(
            "ugro_exporter_collector_down_reason",
            "Why a collector is down, as a fixed reason code (value 1); absent while it is up.",
            labels=["collector", "reason"],
        )
        duration = GaugeMetricFamily(
            "ugro_exporter_collector_scrape_duration_seconds",
            "Time the collector took to produce its part of the last scrape, in seconds.",
            labels=["collector"],
        )
        errors = CounterMetricFamily(
            "ugro_exporter_collector_errors",
            "Failures the collector survived (a query that failed, a source that vanished).",
            labels=["collector"],
        )
        for health in self._healths:
            up.add_metric([health.name], 1 if health.up else 0)
            if health.down_reason is not None:
                reason.add_metric([health.name, health.down_reason], 1)
            if health.last_duration is not None:
                duration.add_metric([health.name], health.last_duration)
            errors.add_metric([health.name], health.errors)
        poll_age = GaugeMetricFamily(
            "ugro_exporter_poll_age_seconds",
            "Age of the readings a collector takes off the scrape path, in seconds.",
            labels=["collector"],
        )
        now = time.monotonic()
        for health in self._healths:
            if health.polled_at is not None:
                poll_age.add_metric([health.name], now - health.polled_at)
        yield from (up, reason, duration, errors, poll_age)

        build = GaugeMetricFamily(
            "ugro_exporter_build_info",
            "Version of the running ugro exporter (value 1).",
            labels=["version", "python_version"],
        )
        build.add_metric([self._version, platform.python_version()], 1)
        yield build
