"""Reading a YAML file a user wrote, safely.

Inventories and the thresholds file are edited by hand and sometimes come from elsewhere, so
reading one is bounded: the file's size is capped, it must be UTF-8, and YAML aliases are
refused (a few hundred bytes of nested aliases expand to gigabytes: the "billion laughs").
ugro's own files never need aliases. Every error names the file and, where YAML knows it, the
line. ``shown`` formats a value for an error message without ever printing all of it.
"""

from __future__ import annotations

import pathlib
import reprlib
from typing import Any

import yaml

MAX_CONFIG_BYTES = 1024 * 1024  # far above any real inventory or thresholds file

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 6
_SHORT.maxlevel = 3


class ConfigFileError(ValueError):
    """A configuration file cannot be read as YAML; the message names the file."""


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses ``*alias`` nodes (anchors alone are harmless)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not accepted", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(path: pathlib.Path, what: str) -> Any:
    """The parsed document of ``path``; ConfigFileError names the file and what went wrong.
    ``what`` says what the file is ("the inventory"), for the message."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigFileError(f"{path}: cannot read {what}: {error.strerror}") from error
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigFileError(
            f"{path}: {what} is larger than {MAX_CONFIG_BYTES // 1024} KiB: not a ugro file?"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigFileError(
            f"{path}: {what} is not UTF-8 text (byte {error.start}): a binary file?"
        ) from error
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader that refuses aliases
    except yaml.YAMLError as error:
        raise ConfigFileError(f"{path}: {what} is not valid YAML: {error}") from error


def shown(value: Any) -> str:
    """``repr(value)``, cut short: a message never prints a huge value whole."""
    return _SHORT.repr(value)
