"""The secret files alertmanager.yml names, checked before Alertmanager needs them.

Alertmanager reads ``*_file`` secrets only when it sends a notification: with a file missing
or empty, ``amtool check-config`` passes and Alertmanager starts "ready", and the error shows
in its log only when the first alert should have gone out. ``problems`` says so up front.
What Alertmanager does with a file's content (its source, notify/slack, notify/webhook,
notify/email): a Slack or webhook URL file is trimmed of surrounding whitespace (so a trailing
newline is fine), but an SMTP password file is used whole up to 0.26 (Debian's package is
0.25) and trimmed only from 0.27: a password file must not end in a newline.
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass
from typing import Any

from ugro.common.config_files import load_yaml

ALERTMANAGER_CONFIG = pathlib.Path(__file__).resolve().parent / "alertmanager.yml"
MAX_SECRET_BYTES = 64 * 1024  # a URL or a password; never printed
_URL = re.compile(r"^https?://\S+$")


@dataclass(frozen=True)
class SecretFile:
    field: str  # where alertmanager.yml names it: "global.smtp_auth_password_file"
    path: pathlib.Path
    kind: str  # "url" (trimmed by Alertmanager) or "password" (used whole up to 0.26)
    sends: str  # what fails without it: "email"


def secret_files(config_file: pathlib.Path = ALERTMANAGER_CONFIG) -> list[SecretFile]:
    """Every secret file the config names, relative paths resolved as Alertmanager does
    (against the config file's folder). ConfigFileError when the config cannot be read."""
    # Alertmanager's format uses aliases (alertmanager.yml shares its Slack config); only the
    # few fields below are read, never a whole value.
    config = load_yaml(config_file, "the Alertmanager config", allow_aliases=True)
    config = config if isinstance(config, dict) else {}
    found: list[SecretFile] = []

    def add(field: str, section: Any, key: str, kind: str, sends: str) -> None:
        value = section.get(key) if isinstance(section, dict) else None
        if isinstance(value, str) and value:
            path = config_file.parent / value
            if all(secret.path != path for secret in found):
                found.append(SecretFile(f"{field}.{key}", path, kind, sends))

    add("global", config.get("global"), "smtp_auth_password_file", "password", "email")
    add("global", config.get("global"), "slack_api_url_file", "url", "Slack message")
    receivers = config.get("receivers")
    for receiver in receivers if isinstance(receivers, list) else []:
        if not isinstance(receiver, dict):
            continue
        name = receiver.get("name")
        for configs, key, kind, sends in (
            ("email_configs", "auth_password_file", "password", "email"),
            ("slack_configs", "api_url_file", "url", "Slack message"),
            ("webhook_configs", "url_file", "url", "webhook call"),
        ):
            entries = receiver.get(configs)
            for index, entry in enumerate(entries if isinstance(entries, list) else []):
                add(f"receivers[{name}].{configs}[{index}]", entry, key, kind, sends)
    return found


def problems(config_file: pathlib.Path = ALERTMANAGER_CONFIG) -> list[str]:
    """One line per secret file that would make a notification fail, naming the file, the
    config field and what is wrong, never the content. ConfigFileError as secret_files."""
    return [
        f"{secret.path} ({secret.field} in {config_file.name}): {problem}"
        for secret in secret_files(config_file)
        if (problem := _problem(secret))
    ]


def _problem(secret: SecretFile) -> str | None:
    try:
        with secret.path.open("rb") as handle:
            raw = handle.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        return f"missing: Alertmanager starts without it, but every {secret.sends} fails"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if len(raw) > MAX_SECRET_BYTES:
        return f"larger than {MAX_SECRET_BYTES // 1024} KiB: not a {secret.kind}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    if not text.strip():
        return f"empty: Alertmanager starts, but every {secret.sends} fails"
    if secret.kind == "url" and not _URL.fullmatch(text.strip()):
        return "does not hold an http(s) URL on one line"
    if secret.kind == "password" and text != text.rstrip("\r\n"):
        return (
            "ends in a newline, which Alertmanager before 0.27 sends as part of the password: "
            "write it with printf '%s'"
        )
    return None
