"""Writing a file that another process may read at any moment.

Standard library only, so that every package (the launcher's agent on a bare node too) can use
it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile


def write_atomically(
    path: pathlib.Path, text: str, *, mode: int = 0o644, make_parents: bool = True
) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new file, never half:
    a temporary file in the same folder, flushed to disk, then renamed over ``path``.

    ``mode`` is the new file's permissions (0o600 for a private one); with ``make_parents``
    false a missing folder is an error rather than created, for folders whose ownership and
    permissions were checked before.
    """
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            os.fchmod(file.fileno(), mode)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
