"""The watcher's own ``ugro-launch stacks``: one dump of every rank when the job stalls.

A job is stalled when Prometheus says so: the catalogue's stall condition (the one
``TrainingStalled`` fires on) holds for one of its ranks. The watcher asks at most every
``check_seconds``; on the first answer that the job is stalled it dumps the ranks' stacks once
and keeps them beside the job's record, as ``JOB.stacks-YYYYmmdd-HHMMSS.txt`` (what
``ugro-launch stacks`` prints) and ``.json`` (what ``--json`` prints). It dumps again only
after the job has stepped again and stalled anew. The stacks are taken while the ranks still
hang: by the time a person reads the page they may have been restarted or stopped.

Prometheus is ``$UGRO_PROMETHEUS_URL`` (as for ``ugro report``; the watcher inherits the
launcher's environment), else ``http://localhost:9090``. When it does not answer, nothing is
dumped and the watcher goes on following the job.
"""

from __future__ import annotations

import datetime
import json
import logging
import pathlib
import time
from collections.abc import Callable

from ugro.catalogue.conditions import STALLED
from ugro.console.servers import Prometheus, QueryError, Unreachable

from . import records
from .launch import JobPlan
from .nodes import NodeSet
from .stacks import collect_stacks, format_report

log = logging.getLogger("ugro.launcher.follower")
CHECK_SECONDS = 10.0
DUMP_SECONDS_PER_RANK = 10.0


class StallDumper:
    """Call :meth:`check` from the watcher's loop; it returns the path of a dump it took."""

    def __init__(
        self,
        plan: JobPlan,
        prometheus: Prometheus | None = None,
        check_seconds: float = CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = plan
        self.prometheus = prometheus or Prometheus(timeout=5.0)
        self.check_seconds = check_seconds
        self.clock = clock
        self.armed = True  # False from a dump until the job is seen not stalled
        self.next_check = 0.0
        self.unreachable_said = False

    def stalled(self) -> bool | None:
        """Is one of the job's ranks stalled? None when Prometheus cannot say."""
        try:
            found = self.prometheus.query(f'{STALLED}{{job_id="{self.plan.job_id}"}}')
        except (Unreachable, QueryError) as error:
            if not self.unreachable_said:  # once: it is normal where no Prometheus runs
                log.info("no stack dumps on stalls: %s", error)
                self.unreachable_said = True
            return None
        return bool(found)

    def check(self, nodes: NodeSet) -> pathlib.Path | None:
        now = self.clock()
        if now < self.next_check:
            return None
        self.next_check = now + self.check_seconds
        stalled = self.stalled()
        if stalled is None:
            return None
        if not stalled:
            self.armed = True
            return None
        if not self.armed:
            return None
        self.armed = False
        return self.dump(nodes)

    def dump(self, nodes: NodeSet) -> pathlib.Path:
        report = collect_stacks(
            self.plan.job_id,
            nodes,
            self.plan.inventory.defaults.workdir,
            list(self.plan.nodes),
            timeout=DUMP_SECONDS_PER_RANK,
            ranks_per_node=self.plan.nproc_per_node,
        )
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = records.state_dir() / f"{self.plan.job_id}.stacks-{stamp}"
        text = base.with_name(base.name + ".txt")
        base.with_name(base.name + ".json").write_text(json.dumps(report.as_json(), indent=2))
        text.write_text(format_report(report) + "\n")
        log.warning("job %s stalled: the stacks of its ranks are in %s", self.plan.job_id, text)
        return text
