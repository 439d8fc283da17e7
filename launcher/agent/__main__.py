"""``python -m ugro.launcher.agent VERB ...``: how the launcher runs the agent on a node."""

import sys

from .cli import main

sys.exit(main())
