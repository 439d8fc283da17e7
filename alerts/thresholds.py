"""Loading ``alerts/thresholds.yml``: every alert threshold, validated, with clear errors."""

from __future__ import annotations

import difflib
import math
import pathlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ugro.common.config_files import ConfigFileError, load_yaml
from ugro.common.messages import shown

THRESHOLDS_FILE = pathlib.Path(__file__).resolve().parent / "thresholds.yml"
_DURATION = re.compile(r"^(0|[1-9][0-9]*)(ms|s|m|h|d)$")
# Every field the rules, dashboards and console read, per section: a misspelled field would
# otherwise load and fail later as a KeyError, and a missing one likewise.
FIELDS: dict[str, tuple[str, ...]] = {
    "training": (
        "nonfinite_for", "nonfinite_window", "loss_spike_factor", "loss_spike_for",
        "loss_ceiling", "loss_ceiling_for", "stall_step_multiple", "stall_min_seconds",
        "stall_for", "throughput_drop_ratio", "throughput_drop_for", "straggler_ratio",
        "straggler_for", "ranks_down_for", "gpu_utilization_low_ratio",
        "gpu_utilization_low_for",
    ),
    "gpu": (
        "temperature_warning_celsius", "temperature_critical_celsius", "temperature_for",
        "throttle_for", "memory_full_ratio", "memory_full_for", "xid_for",
        "ecc_uncorrectable_for", "lost_for",
    ),
    "node": (
        "disk_free_warning_ratio", "disk_free_critical_ratio", "disk_full_for",
        "disk_fill_hours", "disk_fill_for", "memory_available_ratio", "memory_pressure_for",
        "cpu_saturation_ratio", "cpu_saturation_for", "exporter_down_for", "collector_down_for",
    ),
}  # fmt: skip
SECTIONS = tuple(FIELDS)
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
    values: dict[str, Any]  # "section.field" -> number or duration string

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def substitutions(self) -> dict[str, str]:
        """``section_field`` -> text, for ``string.Template`` in rule expressions."""
        return {key.replace(".", "_"): str(value) for key, value in self.values.items()}

    def with_overrides(self, overrides: Mapping[str, Any]) -> Thresholds:
        """A copy with some fields replaced (the end-to-end tests shorten every ``for:``)."""
        unknown = set(overrides) - set(self.values)
        if unknown:
            raise ThresholdsError(f"unknown threshold field(s): {_names(unknown)}")
        for key, value in overrides.items():
            check_value("override", key, value)
        return Thresholds(self.runbook_base_url, {**self.values, **overrides})


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
    values: dict[str, Any] = {}
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
            key = f"{section}.{name}"
            check_value(str(path), key, fields[name])
            values[key] = fields[name]
    return Thresholds(data["runbook_base_url"], values)


def check_runbook_base_url(where: str, url: Any) -> None:
    """Raise ThresholdsError unless ``url`` can go into a rule's annotations as it is."""
    if not isinstance(url, str) or not _RUNBOOK_BASE.fullmatch(url):
        raise ThresholdsError(
            f"{where}: runbook_base_url: expected an http(s) URL or a relative path, without "
            f"quotes, braces, whitespace, backslashes or '#', got {shown(url)}"
        )


def check_value(where: str, key: str, value: Any) -> None:
    """Raise ThresholdsError unless ``value`` suits the field ``key`` (``section.field``)."""
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
