"""What one frame of ``ugro watch`` shows: a ``JobSnapshot`` of the job, its ranks
(``RankState``) and its firing alerts (``AlertState``), and how the statuses and the outcome are
decided from them. Pure data and pure functions: ``gather`` fills a snapshot from the servers,
``watch.render`` draws one.

How a rank's status is decided (first match wins). The conditions are the alerts' own
recorded series (ugro.catalogue.conditions), so the view and the alerts cannot disagree and no
threshold is restated here:

* ``finished``   its last known step count reached the run's target steps, or it closed its
                 telemetry normally (``ugro_train_end_time_seconds``);
* ``down``       Prometheus cannot scrape it (``up == 0``) although it answered before and did
                 not say it finished (as ``job_rank:ugro_train_down:bool`` records);
* ``gone``       it has no scrape target any more (the job's targets were removed);
* ``stalled``    its stall condition holds (no step for longer than the stall alert allows);
* ``non-finite`` its last loss is NaN/±Inf, or its non-finite condition holds (a NaN/Inf loss
                 or gradient norm counted within the alert's window);
* ``straggler``  its straggler condition holds (score below the alert's ratio);
* ``starting``   it has not answered a scrape yet, or has completed no step; ``ok`` otherwise.

The job is ``waiting`` while Prometheus has no series for it, ``starting`` while no rank has
answered, ``finished`` when every rank finished, ``ended`` when its targets are gone
(``ugro-launch`` removes them when the job exits normally or is stopped), ``down`` when a rank
is down, ``stalled`` when a rank is stalled and ``running`` otherwise. With ``--until-done`` the
command exits once the job is over: 0 when it is ``finished`` or ``ended``; 1 when every rank
that did not finish is down and Prometheus fires ``TrainingRanksDown`` for the job (a crash: the
alert's ``for:`` outlasts the few seconds in which a normally ending job's ranks are gone but its
targets not yet removed). A job that never answers is waited for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# The window of the recorded rates (job_rank:…:rate1m): a younger job's rates count time before
# it existed.
RATE_WINDOW_SECONDS = 60.0
# `--until-done` exit codes, by how the job ended (documented in `ugro watch --help`).
OUTCOME_CODES = {"finished": 0, "failed": 1, "stopped": 3, "ended": 4}


# -- the snapshot -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RankState:
    """One rank as Prometheus saw it. ``None`` means Prometheus has no value for it."""

    rank: int
    node: str = ""
    up: bool | None = None  # None: no scrape target (the job's targets were removed)
    answered: bool = True  # it answered a scrape within gather.LOOKBACK
    ended: bool = False  # it closed its telemetry normally (ugro_train_end_time_seconds)
    status: str = "ok"
    steps: float | None = None  # last known, within gather.LOOKBACK
    target_steps: float | None = None
    seconds_since_step: float | None = None
    gpu_utilization: float | None = None  # ratio 0..1; None when the rank has no GPU
    sm_active: float | None = None  # GPM SM activity 0..1; None where the GPU has no GPM
    mfu: float | None = None  # model FLOPs utilisation 0..1; None without FLOPs or a peak
    loss_last: float | None = None
    loss_mean: float | None = None  # mean over the last minute (finite losses)
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    step_seconds: float | None = None  # mean step time over the last minute
    step_seconds_lifetime: float | None = None  # mean over the rank's life (the stall base)
    steps_per_second: float | None = None
    straggler_score: float | None = None  # 1 = the job's median rank
    recent_nonfinite: float | None = None  # non-finite steps within the alert's window
    stalled: bool = False  # the stall condition holds
    straggling: bool = False  # the straggler condition holds


@dataclass(frozen=True)
class AlertState:
    """A firing alert about the job, from Alertmanager."""

    name: str
    severity: str = ""
    summary: str = ""
    since: float | None = None  # Unix seconds
    where: str = ""  # "rank 1 on node-a", or empty for a job-wide alert


@dataclass(frozen=True)
class JobSnapshot:
    """Everything one frame shows. ``taken_at`` is Prometheus's clock (Unix seconds)."""

    job_id: str
    taken_at: float
    prometheus_url: str = ""
    alertmanager_url: str = ""
    status: str = "waiting"
    ranks: list[RankState] = field(default_factory=list)
    world_size: int | None = None
    started_at: float | None = None
    last_step_at: float | None = None
    steps: float | None = None  # the furthest rank's step count
    target_steps: float | None = None
    progress: float | None = None  # ratio 0..1
    steps_per_second: float | None = None
    tokens_per_second: float | None = None  # the whole job
    loss_mean: float | None = None  # the whole job, over 5 minutes
    mfu: float | None = None  # the whole job, over 1 minute
    alerts: list[AlertState] = field(default_factory=list)
    ranks_down_firing: bool = False  # Prometheus fires TrainingRanksDown for the job
    # How ugro-launch's record on this machine says the job ended (finished, failed, stopped,
    # lost), or None: still running, or launched elsewhere.
    recorded_end: str | None = None
    prometheus_error: str | None = None
    alertmanager_error: str | None = None

    @property
    def elapsed_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.last_step_at if self.status in ("finished", "ended") else self.taken_at
        return max(0.0, (end or self.taken_at) - self.started_at)

    @property
    def eta_seconds(self) -> float | None:
        """Time to the target step at the current step rate; None when either is unknown."""
        if self.status != "running" or self.steps is None or self.target_steps is None:
            return None
        if not self.steps_per_second or self.steps_per_second <= 0:
            return None
        return max(0.0, self.target_steps - self.steps) / self.steps_per_second

    @property
    def complete(self) -> bool:
        """Both servers answered and Prometheus knows the job."""
        return (
            self.prometheus_error is None
            and self.alertmanager_error is None
            and self.status != "waiting"
        )

    @property
    def outcome(self) -> int | None:
        """None while the job goes on; else ``--until-done``'s exit code: 0 finished, 1 failed
        (crashed, ranks down, lost), 3 stopped, 4 ended without saying how (its targets are
        gone, its ranks did not say they finished, and no record of it here)."""
        if self.status == "finished":
            return OUTCOME_CODES["finished"]
        if self.recorded_end is not None:  # the launcher saw how it ended
            return OUTCOME_CODES.get(self.recorded_end, OUTCOME_CODES["failed"])
        if self.prometheus_error is not None:
            return None
        if self.status == "ended":
            return OUTCOME_CODES["ended"]
        if self.ranks_down_firing and all(r.status in ("finished", "down") for r in self.ranks):
            return OUTCOME_CODES["failed"]
        return None


# -- deciding statuses --------------------------------------------------------------------------


def rank_status(rank: RankState) -> str:
    """The rank's status, as described in the module docstring."""
    if rank.steps is not None and rank.target_steps and rank.steps >= rank.target_steps:
        return "finished"
    if rank.ended:  # said so before it went: a loop without total_steps finishes too
        return "finished"
    if rank.up is False:
        return "down" if rank.answered else "starting"
    if rank.up is None:
        return "gone"
    if rank.stalled:
        return "stalled"
    if (rank.loss_last is not None and not math.isfinite(rank.loss_last)) or (
        rank.recent_nonfinite or 0
    ) > 0:
        return "non-finite"
    if rank.straggling:
        return "straggler"
    if not rank.steps:
        return "starting"
    return "ok"


def job_status(ranks: list[RankState]) -> str:
    """The job's status from its ranks' (already decided) statuses."""
    if not ranks:
        return "waiting"
    statuses = {r.status for r in ranks}
    if statuses == {"finished"}:
        return "finished"
    if statuses <= {"finished", "gone"}:
        return "ended"
    if not any(r.answered for r in ranks):
        return "starting"
    if "down" in statuses:
        return "down"
    if "stalled" in statuses:
        return "stalled"
    return "running"


def job_rates(
    *,
    windowed: tuple[float | None, float | None],
    totals: tuple[float | None, float],
    started_at: float | None,
    taken_at: float,
) -> tuple[float | None, float | None]:
    """Steps/s and tokens/s of a job: the recorded 1-minute rates, except while the job is
    younger than their window, whose rates would count time before it existed; then what the
    data supports, its totals since its start."""
    steps, tokens = totals
    if started_at is None or not steps:
        return windowed
    age = taken_at - started_at
    if not 0 < age < RATE_WINDOW_SECONDS:
        return windowed
    return steps / age, (tokens / age if tokens else windowed[1])


def with_record(frame: JobSnapshot, end: str | None) -> JobSnapshot:
    """The frame, told how the job ended where Prometheus no longer shows it running."""
    if end is None or frame.status not in ("waiting", "ended", "down", "starting"):
        return frame
    return replace(frame, recorded_end=end, status=end)
