"""Reading a YAML file a user wrote, safely.

Inventories and the thresholds file are edited by hand and sometimes come from elsewhere, so
reading one is bounded: the file's size is capped, it must be UTF-8, YAML aliases are refused
(a few hundred bytes of nested aliases expand to gigabytes: the "billion laughs") and so is
nesting deeper than any ugro file needs (PyYAML composes nodes recursively). ugro's own files
never need aliases. Every error names the file and, where YAML knows it, the line.
"""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

MAX_CONFIG_BYTES = 1024 * 1024  # far above any real inventory or thresholds file
MAX_NESTING = 64  # ugro's files nest 4 levels; Python's stack gives out near 1000


class ConfigFileError(ValueError):
    """A configuration file cannot be read as YAML; the message names the file."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses ``*alias`` nodes (anchors alone are harmless) and deep nesting,
    and reports a scalar that cannot be converted (a 5000-digit integer, the 13th month) as a
    YAML error at its line rather than a bare ValueError."""

    _depth = 0
    _aliases = False

    def compose_node(self, parent: Any, index: Any) -> Any:
        if not self._aliases and self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not accepted", event.start_mark
            )
        if self._depth >= MAX_NESTING:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_NESTING} levels", self.peek_event().start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as error:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {error}", node.start_mark
            ) from error


class _AliasLoader(_BoundedLoader):
    _aliases = True


def load_yaml(path: pathlib.Path, what: str, *, allow_aliases: bool = False) -> Any:
    """The parsed document of ``path``; ConfigFileError names the file and what went wrong.
    ``what`` says what the file is ("the inventory"), for the message. ``allow_aliases`` is for
    a file in a format that uses them (alertmanager.yml): its caller must not walk or print
    whole values, which aliases can make huge (PyYAML shares aliased nodes, so loading is
    cheap)."""
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
        # A SafeLoader, bounded as above.
        return yaml.load(text, Loader=_AliasLoader if allow_aliases else _BoundedLoader)
    except yaml.YAMLError as error:
        raise ConfigFileError(f"{path}: {what} is not valid YAML: {_one_line(error)}") from error


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's message spans lines (context, problem, a quoted snippet): the problem and
    where it is, on one line."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        context = f"{error.context}: " if error.context else ""
        return f"{context}{error.problem}{where}"
    return " ".join(str(error).replace('"<unicode string>", ', "").split())
