"""The names ugro accepts for a job and a node, in one place.

A job id becomes a Prometheus label value, a file name on every node and an argument on remote
command lines; a node name a file name and a label value. Both keep to a safe alphabet and never
start with '.', '_' or '-' (a hidden file, an option). Match with ``fullmatch``: ``$`` alone
lets a final newline through. Standard library only: the trainer imports this module.
"""

from __future__ import annotations

import re

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
JOB_ID_EXPECTED = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"

# A DNS label's length: node names often are host names.
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
