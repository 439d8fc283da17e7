"""Putting values a user gave into error messages."""

from __future__ import annotations

import reprlib
from typing import Any

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 6
_SHORT.maxlevel = 2


def shown(value: Any) -> str:
    """``repr(value)``, cut short: a message never prints a huge value (an expanded YAML
    structure, a megabyte string) whole."""
    return _SHORT.repr(value)
