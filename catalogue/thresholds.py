"""The alert thresholds, typed: loaded from ``alerts/thresholds.yml``, validated, with clear
errors. Each section is a dataclass; its fields are the file's fields, so a field is added in
two places only: here (with its type) and in the file (with its value and comment)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import pathlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ugro.common.config_files import ConfigFileError, load_yaml
from ugro.common.messages import shown

# The file ships in the ugro.alerts package (package data), beside the rules it generates.
THRESHOLDS_FILE = pathlib.Path(str(importlib.resources.files("ugro.alerts"))) / "thresholds.yml"
_DURATION = re.compile(r"^(0|[1-9][0-9]*)(ms|s|m|h|d)$")
Duration = str  # a Prometheus duration: 30s, 5m, 1h


@dataclass(frozen=True)
class TrainingThresholds:
    nonfinite_for: Duration
    nonfinite_window: Duration
    loss_spike_factor: float
    loss_spike_for: Duration
    loss_ceiling: float
    loss_ceiling_for: Duration
    stall_step_multiple: float
    stall_min_seconds: float
    stall_for: Duration
    throughput_drop_ratio: float
    throughput_drop_for: Duration
    straggler_ratio: float
    straggler_for: Duration
    ranks_down_for: Duration
    gpu_utilization_low_ratio: float
    gpu_utilization_low_for: Duration
    tensor_active_low_ratio: float
    tensor_active_low_for: Duration
    allocator_retries_count: float
    allocator_retries_window: Duration
    allocator_retries_for: Duration
    not_started_seconds: float
    not_started_for: Duration
    hung_rank_for: Duration | None  # None: the same as stall_for
    checkpoint_max_age_seconds: float | None  # None: no checkpoint alert
    checkpoint_overdue_for: Duration

    @property
    def hung_rank_duration(self) -> Duration:
        """The hung-rank alert's ``for:``: its own, or the stall alert's, whose page it
        replaces."""
        return self.hung_rank_for if self.hung_rank_for is not None else self.stall_for


@dataclass(frozen=True)
class GpuThresholds:
    temperature_warning_celsius: float
    temperature_critical_celsius: float
    temperature_for: Duration
    throttle_for: Duration
    memory_full_ratio: float
    memory_full_for: Duration
    xid_for: Duration
    ecc_uncorrectable_for: Duration
    lost_for: Duration
    recovery_for: Duration


@dataclass(frozen=True)
class NodeThresholds:
    disk_free_warning_ratio: float
    disk_free_critical_ratio: float
    disk_full_for: Duration
    disk_fill_hours: float
    disk_fill_for: Duration
    memory_available_ratio: float
    memory_pressure_for: Duration
    cpu_saturation_ratio: float
    cpu_saturation_for: Duration
    exporter_down_for: Duration
    collector_down_for: Duration


_SECTION_TYPES = {"training": TrainingThresholds, "gpu": GpuThresholds, "node": NodeThresholds}
# Every field per section: a misspelled field would otherwise load and fail later, a missing
# one likewise.
FIELDS: dict[str, tuple[str, ...]] = {
    section: tuple(f.name for f in dataclasses.fields(kind))
    for section, kind in _SECTION_TYPES.items()
}
SECTIONS = tuple(FIELDS)
# Fields that may be null: a default taken from another field, or a feature left off.
NULLABLE = {"training.hung_rank_for", "training.checkpoint_max_age_seconds"}
# runbook_base_url goes into every rule's annotations, which Prometheus reads as templates: a
# quote or brace there breaks the rule file, whitespace or a backslash breaks the link, and
# "#<alert>" is appended to it. An http(s) URL, or a path relative to where the alert is read
# (the shipped alerts/runbook.md): no other scheme, hence no ':' after the host.
_RUNBOOK_BASE = re.compile(r"^(https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?)?[^\s\"'`{}\\<>#:]+$")


class ThresholdsError(ValueError):
    """The thresholds file has a missing, unknown or malformed field."""


@dataclass(frozen=True)
class Thresholds:
    runbook_base_url: str
    training: TrainingThresholds
    gpu: GpuThresholds
    node: NodeThresholds

    def with_overrides(self, overrides: Mapping[str, Any]) -> Thresholds:
        """A copy with some fields replaced, named ``section.field`` (the end-to-end tests and
        the demo shorten every ``for:``)."""
        changed: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if name not in FIELDS.get(section, ()):
                raise ThresholdsError(f"unknown threshold field {shown(key)}")
            check_value("override", key, value)
            changed.setdefault(section, {})[name] = value
        sections = {s: dataclasses.replace(getattr(self, s), **v) for s, v in changed.items()}
        return dataclasses.replace(self, **sections)


def load_thresholds(path: pathlib.Path = THRESHOLDS_FILE) -> Thresholds:
    """Read and validate the file; every error names the file, the field and what was expected."""
    try:
        data = load_yaml(path, "the thresholds file")
    except ConfigFileError as error:
        raise ThresholdsError(str(error)) from error
    top = ("runbook_base_url", *SECTIONS)
    if not isinstance(data, dict):
        raise ThresholdsError(f"{path}: expected a mapping with {', '.join(top)}")
    unknown = set(data) - set(top)
    if unknown:
        raise ThresholdsError(
            f"{path}: unknown section(s) {_names(unknown)}{_hint(unknown, top)}; "
            f"known: {', '.join(top)}"
        )
    check_runbook_base_url(str(path), data.get("runbook_base_url"))
    sections: dict[str, Any] = {}
    for section, known in FIELDS.items():
        fields = data.get(section)
        if not isinstance(fields, dict):
            raise ThresholdsError(f"{path}: {section}: expected a mapping of thresholds")
        unknown = set(fields) - set(known)
        if unknown:
            raise ThresholdsError(
                f"{path}: {section}: unknown field(s) {_names(unknown)}{_hint(unknown, known)}; "
                f"known fields: {', '.join(known)}"
            )
        missing = [name for name in known if name not in fields]
        if missing:
            raise ThresholdsError(f"{path}: {section}: missing field(s) {', '.join(missing)}")
        for name in known:
            check_value(str(path), f"{section}.{name}", fields[name])
        sections[section] = _SECTION_TYPES[section](**{name: fields[name] for name in known})
    return Thresholds(data["runbook_base_url"], **sections)


def check_runbook_base_url(where: str, url: Any) -> None:
    """Raise ThresholdsError unless ``url`` can go into a rule's annotations as it is."""
    if not isinstance(url, str) or not _RUNBOOK_BASE.fullmatch(url):
        raise ThresholdsError(
            f"{where}: runbook_base_url: expected an http(s) URL or a relative path, without "
            f"quotes, braces, whitespace, backslashes or '#', got {shown(url)}"
        )


def check_value(where: str, key: str, value: Any) -> None:
    """Raise ThresholdsError unless ``value`` suits the field ``key`` (``section.field``)."""
    if value is None and key in NULLABLE:
        return
    if key.endswith(("_for", "_window")):
        if (
            not isinstance(value, str)
            or not _DURATION.fullmatch(value)
            or (key.endswith("_window") and value == "0")
        ):
            raise ThresholdsError(
                f"{where}: {key}: expected a Prometheus duration such as 30s or 5m, "
                f"got {shown(value)}"
            )
    elif (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not _finite(value)  # `> nan` is valid PromQL that never fires; `> inf` likewise
        or value < 0
    ):
        raise ThresholdsError(f"{where}: {key}: expected a finite number >= 0, got {shown(value)}")
    elif key.endswith("_ratio") and value > 1:
        raise ThresholdsError(f"{where}: {key}: expected a ratio in 0..1, got {shown(value)}")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float: Prometheus would read it as +Inf
        return False


def _names(keys: Iterable[Any]) -> str:
    """Field names a user wrote, for a message: any YAML key, each shown briefly."""
    return ", ".join(sorted(key if isinstance(key, str) and len(key) <= 80 else shown(key)
                            for key in keys))  # fmt: skip


def _hint(unknown: set[Any], known: Iterable[str]) -> str:
    """ " (did you mean X?)" for a single misspelled name."""
    if len(unknown) != 1 or not isinstance(name := next(iter(unknown)), str):
        return ""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
