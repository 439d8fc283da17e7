"""Loading ``alerts/thresholds.yml``: every alert threshold, validated, with clear errors."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ugro.common.config_files import ConfigFileError, load_yaml, shown

THRESHOLDS_FILE = pathlib.Path(__file__).resolve().parent / "thresholds.yml"
_DURATION = re.compile(r"^(0|[1-9][0-9]*)(ms|s|m|h|d)$")
SECTIONS = ("training", "gpu", "node")


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
            raise ThresholdsError(f"unknown threshold field(s): {', '.join(sorted(unknown))}")
        for key, value in overrides.items():
            check_value("override", key, value)
        return Thresholds(self.runbook_base_url, {**self.values, **overrides})


def load_thresholds(path: pathlib.Path = THRESHOLDS_FILE) -> Thresholds:
    """Read and validate the file; every error names the file, the field and what was expected."""
    try:
        data = load_yaml(path, "the thresholds file")
    except ConfigFileError as error:
        raise ThresholdsError(str(error)) from error
    if not isinstance(data, dict):
        raise ThresholdsError(f"{path}: expected a mapping with {', '.join(SECTIONS)}")
    url = data.get("runbook_base_url")
    if not isinstance(url, str) or not url:
        raise ThresholdsError(f"{path}: runbook_base_url: expected a non-empty string")
    unknown = set(data) - {"runbook_base_url", *SECTIONS}
    if unknown:
        raise ThresholdsError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for section in SECTIONS:
        fields = data.get(section)
        if not isinstance(fields, dict):
            raise ThresholdsError(f"{path}: {section}: expected a mapping of thresholds")
        for name, value in fields.items():
            key = f"{section}.{name}"
            check_value(str(path), key, value)
            values[key] = value
    return Thresholds(url, values)


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
    elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ThresholdsError(f"{where}: {key}: expected a number >= 0, got {shown(value)}")
    elif key.endswith("_ratio") and value > 1:
        raise ThresholdsError(f"{where}: {key}: expected a ratio in 0..1, got {shown(value)}")
