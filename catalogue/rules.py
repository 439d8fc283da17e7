"""Rule files as data, and their text: one renderer for the recording and the alert rules, so
that the generated YAML keeps the comments that say why a rule is written the way it is."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Record:
    """A recording rule. ``why`` becomes a comment above it in the generated file."""

    name: str
    expr: str
    why: str = ""


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    duration: str  # the `for:`
    labels: dict[str, str]
    annotations: dict[str, str]


@dataclass(frozen=True)
class Group:
    name: str
    rules: list[Record | AlertRule]
    why: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def render(groups: list[Group], header: str) -> str:
    """The rule file's YAML. Expressions are literal blocks (PromQL ignores the newlines);
    every other string is double-quoted, so no value is ever read as YAML syntax."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines.append("groups:")
    for number, group in enumerate(groups):
        if number:
            lines.append("")
        lines += _comment(group.why, "  ")
        lines.append(f"  - name: {_quoted(group.name)}")
        lines.append("    rules:")
        for rule in group.rules:
            if isinstance(rule, Record):
                lines += _comment(rule.why, "      ")
                lines.append(f"      - record: {_quoted(rule.name)}")
                lines += _block("expr", rule.expr, "        ")
            else:
                lines.append(f"      - alert: {_quoted(rule.name)}")
                lines += _block("expr", rule.expr, "        ")
                lines.append(f"        for: {_quoted(rule.duration)}")
                lines += _mapping("labels", rule.labels, "        ")
                lines += _mapping("annotations", rule.annotations, "        ")
    return "\n".join(lines) + "\n"


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.strip().splitlines()] if text else []


def _block(key: str, text: str, indent: str) -> list[str]:
    body = [f"{indent}  {line}".rstrip() for line in text.strip().splitlines()]
    return [f"{indent}{key}: |-", *body]


def _mapping(key: str, values: dict[str, str], indent: str) -> list[str]:
    return [f"{indent}{key}:"] + [f"{indent}  {k}: {_quoted(v)}" for k, v in values.items()]


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar (JSON's escapes are YAML's)."""
    return json.dumps(text, ensure_ascii=False)
