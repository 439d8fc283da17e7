"""Files a careless or hostile user may hand a config loader."""

from __future__ import annotations

import itertools

# A PNG header, then bytes that are not UTF-8.
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00\x01"


def billion_laughs() -> str:
    """A flow sequence of ~370 bytes whose last element expands to 9**9 strings."""
    names = "abcdefghi"
    parts = ["&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for previous, name in itertools.pairwise(names):
        parts.append(f"&{name} [{','.join([f'*{previous}'] * 9)}]")
    return f"[{', '.join(parts)}]"
