"""Where a job's time went, and its checkpoints, for ``ugro report``: ``add_time_accounting``
reads them from Prometheus into a ``JobReport``; ``account`` and the functions before it do
the arithmetic on what was read, and need no server.

The categories are ``ugro.catalogue.goodput``'s, the definition the dashboard's recording rules
use too. How each figure is made (the documentation of record; ``collect.py`` documents the
rest of the report):

* **Phase seconds** of a rank: ``ugro_train_phase_seconds_total`` per phase, over every
  process the rank ran as (an *incarnation*; torchrun's ``--max-restarts`` starts a new one).
  Each counter counts from 0 at its process's start, so an incarnation's seconds are the
  counter's last scraped value, and the rank's are their sum: what ``increase()`` over the run
  comes to, without its extrapolation at the window's edges. A drop of a counter, or a new
  ``ugro_train_process_start_time_seconds``, starts a new incarnation.
* **Wall time** of a rank: from its first process's start to its last scrape, i.e. the phase
  seconds plus the gaps between incarnations (first start to last start, plus the last
  incarnation's seconds). The job's figures are the mean rank's; its shares are those of all
  its ranks' wall time together. A process's start is known to about a second (psutil reads
  the kernel's boot time in whole seconds), so a gap shorter than that may show as none; the
  wall time never comes out shorter than the phase seconds.
* **productive, data, checkpoint, evaluation, startup**: the phase seconds of the category's
  phases, less what the next two take out of them.
* **stalled**: the stalled condition (``job_rank:ugro_train_stalled:condition``, value: seconds
  since the rank's last step) is read sample by sample; samples that imply the same last step
  (evaluation time − value) are one episode, and the episode's largest value is its stalled
  seconds. They are taken out of the phase the rank was in when the episode was first seen
  (``ugro_train_phase``: where it is stuck, the stall being under way by then), and out of
  its productive phases for what that phase has not got (or when it is unknown).
* **restarts**: the gaps above (no live process), plus, for each incarnation that was
  restarted, the work it redid: from its last checkpoint (``ugro_train_last_checkpoint_
  timestamp_seconds`` within it) or, without one, from the end of its first step (its start +
  its startup seconds) to its last step (``ugro_train_last_step_timestamp_seconds``), taken out
  of the phases it was counted in, in the proportions its counters rose between those two
  moments (interpolated between scrapes).
* **Checkpoints**: count = ``ugro_train_checkpoints_total`` of the rank that counted most
  (summed over its incarnations); steps between them = the step count at the last checkpoint
  (``ugro_train_steps_total`` as last scraped before it completed) over the checkpoints of
  that incarnation; the last one's time and duration (``ugro_train_last_checkpoint_
  {timestamp,duration}_seconds``, the latest of any rank, the longest duration among the ranks
  that took it); time spent and share = the checkpoint category; bytes =
  ``ugro_train_checkpoint_bytes_total`` summed over ranks, where a rank reported them.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ugro.catalogue import conditions
from ugro.catalogue import goodput as definition
from ugro.common import phases

from .job_queries import JobQueries, rank_key, server_time
from .job_report import Checkpoints, JobReport, RankTime, TimeAccounting
from .servers import Prometheus

PHASE_SECONDS = "ugro_train_phase_seconds_total"
PHASE = "ugro_train_phase"
PROCESS_START = "ugro_train_process_start_time_seconds"
LAST_STEP = "ugro_train_last_step_timestamp_seconds"
CHECKPOINTS = "ugro_train_checkpoints_total"
CHECKPOINT_BYTES = "ugro_train_checkpoint_bytes_total"
LAST_CHECKPOINT = "ugro_train_last_checkpoint_timestamp_seconds"
LAST_CHECKPOINT_DURATION = "ugro_train_last_checkpoint_duration_seconds"
# What a restarted rank's incarnations are told apart and accounted by, sample by sample.
RESTART_SERIES = (PHASE_SECONDS, PROCESS_START, LAST_STEP, LAST_CHECKPOINT, CHECKPOINTS,
                  CHECKPOINT_BYTES)  # fmt: skip

# Two process start times (Unix seconds) this close are one process. A restarted process starts
# seconds later (torchrun's restart, imports); a distributed store that keeps about 12
# significant digits (VictoriaMetrics) moves a Unix time by up to a millisecond.
SAME_START_SECONDS = 1.0

# Two stalled-condition samples belong to one episode when the last steps they imply agree
# to within this: the condition is time() minus a timestamp, exact to float64 rounding.
SAME_STEP_SECONDS = 0.01

Samples = list[tuple[float, float]]  # (Unix seconds, value), oldest first


# -- arithmetic on what was read -------------------------------------------------------------


def counter_total(samples: Samples) -> float:
    """What a counter that starts from 0 with each process counted over ``samples``: its last
    value before each reset plus its last value."""
    total, previous = 0.0, None
    for _, value in samples:
        if previous is not None and value < previous:
            total += previous
        previous = value
    return total + (previous or 0.0)


@dataclass(frozen=True)
class StallEpisode:
    last_step: float  # Unix seconds of the step the rank made before it
    seconds: float  # the condition's largest value in it
    first_seen: float  # the first evaluation at which the condition held


def stall_episodes(samples: Samples) -> list[StallEpisode]:
    """One rank's stall episodes, from its stalled condition's samples."""
    episodes: list[StallEpisode] = []
    for t, value in sorted(samples):
        if not math.isfinite(value):
            continue
        last_step = t - value
        if episodes and abs(episodes[-1].last_step - last_step) <= SAME_STEP_SECONDS:
            previous = episodes[-1]
            seconds = max(previous.seconds, value)
            episodes[-1] = StallEpisode(previous.last_step, seconds, previous.first_seen)
        else:
            episodes.append(StallEpisode(last_step, value, t))
    return episodes


@dataclass
class Incarnation:
    """One process of a rank, as its scrapes saw it."""

    started: float  # Unix seconds its process started
    counters: dict[str, Samples] = field(default_factory=dict)  # phase → its counter's samples
    last_step: float | None = None
    last_checkpoint: float | None = None
    checkpoints: float = 0.0  # the last scraped value of its checkpoint counter
    checkpoint_bytes: float | None = None

    @property
    def phase_seconds(self) -> dict[str, float]:
        return {phase: samples[-1][1] for phase, samples in self.counters.items() if samples}

    def counted_at(self, t: float) -> dict[str, float]:
        """Each phase counter's value at ``t``, interpolated between scrapes (0 at the start)."""
        out = {}
        for phase, samples in self.counters.items():
            times = [self.started] + [s for s, _ in samples]
            values = [0.0] + [v for _, v in samples]
            i = bisect.bisect_right(times, t)
            if i >= len(times):
                out[phase] = values[-1]
            elif i == 0:
                out[phase] = 0.0
            else:
                (t0, v0), (t1, v1) = (times[i - 1], values[i - 1]), (times[i], values[i])
                out[phase] = v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1
        return out

    def redone_work(self) -> dict[str, float]:
        """Phase → seconds of the work lost when this incarnation was restarted: from its last
        checkpoint (or the end of its first step) to its last step."""
        if self.last_step is None:
            return {}
        first_step_end = self.started + self.phase_seconds.get(phases.STARTUP, 0.0)
        since = first_step_end
        if self.last_checkpoint is not None and self.last_checkpoint >= self.started:
            since = self.last_checkpoint
        lost = self.last_step - since
        if lost <= 0:
            return {}
        before, after = self.counted_at(since), self.counted_at(self.last_step)
        rose = {p: max(0.0, after[p] - before.get(p, 0.0)) for p in after}
        total = sum(rose.values())
        if total <= 0:
            return {phases.STEP: lost}
        return {p: lost * s / total for p, s in rose.items() if s > 0}


def split_incarnations(series: Mapping[str, Mapping[str, Samples]]) -> list[Incarnation]:
    """A restarted rank's raw samples (metric name → phase label, or "" → samples) cut into
    incarnations: a new one begins where the process start time changes or the sum of the
    phase counters drops."""
    counters = series.get(PHASE_SECONDS, {})
    by_time: dict[float, dict[str, float]] = defaultdict(dict)
    for phase, samples in counters.items():
        for t, value in samples:
            by_time[t][phase] = value
    starts = dict(series.get(PROCESS_START, {}).get("", []))
    times = sorted(by_time)
    boundaries, previous_total, previous_start = [], None, None
    for t in times:
        total = sum(by_time[t].values())
        start = starts.get(t)
        new_start = (
            start is not None
            and previous_start is not None
            and abs(start - previous_start) > SAME_START_SECONDS
        )
        if not boundaries or new_start or (previous_total is not None and total < previous_total):
            boundaries.append(t)
        previous_total = total
        previous_start = start if start is not None else previous_start

    incarnations = []
    for i, first in enumerate(boundaries):
        until = boundaries[i + 1] if i + 1 < len(boundaries) else math.inf
        # The process start: its own gauge, else what the counters at its first scrape imply
        # (they add up to the seconds since it started).
        started = starts.get(first, first - sum(by_time[first].values()))
        incarnation = Incarnation(started=started)
        for phase, samples in counters.items():
            inside = [(t, v) for t, v in samples if first <= t < until]
            if inside:
                incarnation.counters[phase] = inside

        def last(name: str, first: float = first, until: float = until) -> float | None:
            inside = [v for t, v in series.get(name, {}).get("", []) if first <= t < until]
            return inside[-1] if inside else None

        incarnation.last_step = last(LAST_STEP)
        incarnation.last_checkpoint = last(LAST_CHECKPOINT)
        incarnation.checkpoints = last(CHECKPOINTS) or 0.0
        incarnation.checkpoint_bytes = last(CHECKPOINT_BYTES)
        incarnations.append(incarnation)
    return incarnations


def _take(remaining: dict[str, float], order: Iterable[str], seconds: float) -> float:
    """Takes up to ``seconds`` out of the phases in ``order``; returns how much it took."""
    taken = 0.0
    for phase in order:
        if taken >= seconds:
            break
        part = min(seconds - taken, remaining.get(phase, 0.0))
        if part > 0:
            remaining[phase] -= part
            taken += part
    return taken


def account(
    rank: int,
    phase_seconds: Mapping[str, float],
    wall_seconds: float,
    stalls: Iterable[tuple[str | None, float]] = (),
    redone: Iterable[Mapping[str, float]] = (),
    incarnations: int = 1,
) -> RankTime:
    """A rank's seconds per category: its phase seconds grouped, less what stalls (phase it was
    in, seconds) and redone work (phase → seconds) take out of them, plus the time without a
    live process (``wall_seconds`` − the phase seconds). A phase this version does not know
    counts in no category: its seconds are left out, not guessed."""
    remaining = dict(phase_seconds)
    productive = [p for p in phases.PRODUCTIVE if p in remaining]
    stall_list = list(stalls)
    stalled = 0.0
    for phase, seconds in stall_list:
        order = [phase, *productive] if phase in remaining else productive
        stalled += _take(remaining, order, seconds)
    restarts = max(0.0, wall_seconds - sum(phase_seconds.values()))
    for part in redone:
        for phase, seconds in part.items():
            restarts += _take(remaining, [phase], seconds)
    out = dict.fromkeys(definition.CATEGORIES, 0.0)
    for phase, seconds in remaining.items():
        try:
            out[definition.category_of(phase)] += seconds
        except ValueError:
            continue
    out[definition.STALLED] = stalled
    out[definition.RESTARTS] = restarts
    return RankTime(
        rank=rank,
        wall_seconds=max(wall_seconds, sum(phase_seconds.values())),
        seconds=out,
        phase_seconds=dict(phase_seconds),
        incarnations=incarnations,
        stall_episodes=len(stall_list),
    )


# -- reading it from Prometheus --------------------------------------------------------------


def add_time_accounting(prometheus: Prometheus, report: JobReport) -> JobReport:
    """Fills ``report.time_accounting`` and ``report.checkpoints`` from the job's series over
    its run; leaves them None where the ranks report no phases (telemetry older than phases).
    Raises Unreachable or QueryError as ``collect`` does."""
    now = server_time(prometheus)
    q = JobQueries(prometheus, report.job_id, now, now - report.start_time + 60)
    last_phase = _by_rank_label(
        q.vector(f"max by (rank, phase) (last_over_time({PHASE_SECONDS}{{$sel}}[$w]))"), "phase"
    )
    if not last_phase:
        return report
    restarted = set(q.by_rank(f"max by (rank) (resets({PHASE_SECONDS}{{$sel}}[$w])) > 0"))
    # Not changes(): a store may count a staleness marker or its rounding as a change.
    moved = (
        f"max_over_time({PROCESS_START}{{$sel}}[$w]) - min_over_time({PROCESS_START}{{$sel}}[$w])"
    )
    restarted |= set(q.by_rank(f"max by (rank) ({moved}) > {SAME_START_SECONDS:g}"))
    lives = {rank: _incarnations(q, rank) for rank in sorted(restarted)}

    episodes: dict[int, list[StallEpisode]] = defaultdict(list)
    condition = _raw_by_rank(q.matrix(f"{conditions.STALLED}{{$sel}}[$w]", now))
    for rank, samples in condition.items():
        episodes[rank] = stall_episodes(samples)

    ranks = []
    for rank, counted in sorted(last_phase.items()):
        incarnations = lives.get(rank) or []
        stalls = [(_phase_at(q, rank, e.first_seen), e.seconds) for e in episodes.get(rank, [])]
        if len(incarnations) > 1:
            totals: dict[str, float] = defaultdict(float)
            for life in incarnations:
                for phase, seconds in life.phase_seconds.items():
                    totals[phase] += seconds
            last = incarnations[-1]
            wall = last.started - incarnations[0].started + sum(last.phase_seconds.values())
            redone = [life.redone_work() for life in incarnations[:-1]]
            ranks.append(account(rank, totals, wall, stalls, redone, len(incarnations)))
        else:
            ranks.append(account(rank, counted, sum(counted.values()), stalls))
    report.time_accounting = TimeAccounting(definition.CATEGORIES, ranks)
    report.checkpoints = _checkpoints(q, report, lives)
    return report


def _by_rank_label(samples: list[dict], label: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for sample in samples:
        rank, value = rank_key(sample["metric"]), float(sample["value"][1])
        if rank is not None and math.isfinite(value):
            out[rank][sample["metric"].get(label, "")] = value
    return dict(out)


def _finite_points(values: list[list]) -> Samples:
    """A series' finite samples. A distributed store may return Prometheus's staleness
    markers as NaN points where Prometheus returns none (VictoriaMetrics does); counters,
    timestamps and conditions are never NaN otherwise."""
    points = ((float(t), float(v)) for t, v in values)
    return [(t, v) for t, v in points if math.isfinite(v)]


def _raw_by_rank(matrix: list[dict]) -> dict[int, Samples]:
    out: dict[int, Samples] = defaultdict(list)
    for series in matrix:
        rank = rank_key(series["metric"])
        if rank is not None:
            out[rank].extend(_finite_points(series["values"]))
    return {rank: sorted(samples) for rank, samples in out.items()}


def _incarnations(q: JobQueries, rank: int) -> list[Incarnation]:
    """A restarted rank's incarnations, from its raw samples over the run (only restarted
    ranks are read sample by sample: the others' last values say it all)."""
    names = "|".join(RESTART_SERIES)
    matrix = q.matrix(f'{{__name__=~"{names}",$sel,rank="{rank}"}}[$w]', q.now)
    series: dict[str, dict[str, Samples]] = defaultdict(lambda: defaultdict(list))
    for found in matrix:
        labels = found["metric"]
        samples = series[labels.get("__name__", "")][labels.get("phase", "")]
        samples.extend(_finite_points(found["values"]))
    for by_label in series.values():
        for samples in by_label.values():
            samples.sort()
    return split_incarnations(series)


def _phase_at(q: JobQueries, rank: int, at: float) -> str | None:
    """The phase ``rank`` was in at ``at``: the newest ``ugro_train_phase`` sample then."""
    found = q.vector(f'timestamp({PHASE}{{$sel,rank="{rank}"}})', at)
    newest = max(found, key=lambda s: float(s["value"][1]), default=None)
    return newest["metric"].get("phase") if newest else None


def _checkpoints(
    q: JobQueries, report: JobReport, lives: dict[int, list[Incarnation]]
) -> Checkpoints:
    def last(metric: str) -> dict[int, float]:
        return q.by_rank(f"max by (rank) (last_over_time({metric}{{$sel}}[$w]))")

    counts, byte_counts = last(CHECKPOINTS), last(CHECKPOINT_BYTES)
    totals = dict(counts)
    bytes_totals = dict(byte_counts)
    for rank, incarnations in lives.items():  # restarted: every incarnation's checkpoints
        if rank in totals:
            totals[rank] = sum(life.checkpoints for life in incarnations)
        if rank in bytes_totals:
            bytes_totals[rank] = sum(life.checkpoint_bytes or 0.0 for life in incarnations)
    count = round(max(totals.values(), default=0.0))
    accounting = report.time_accounting
    seconds = accounting.seconds[definition.CHECKPOINT] if accounting else None
    share = accounting.shares()[definition.CHECKPOINT] if accounting else None
    if count == 0:
        return Checkpoints(count=0, seconds=seconds, share=share)

    times, durations = last(LAST_CHECKPOINT), last(LAST_CHECKPOINT_DURATION)
    last_time = max(times.values(), default=None)
    took = None
    if last_time is not None:
        # Every rank takes part in a checkpoint (the others wait for the one that writes): the
        # job waited for the longest.
        latest = [r for r, t in times.items() if t >= last_time - 1.0 and r in durations]
        took = max((durations[r] for r in latest), default=None)
    steps_between = None
    if last_time is not None:
        newest = max(times, key=times.__getitem__)
        at_last = _steps_at(q, newest, last_time)
        in_incarnation = counts.get(newest)
        if at_last is not None and in_incarnation:
            steps_between = at_last / in_incarnation
    return Checkpoints(
        count=count,
        steps_between_mean=steps_between,
        last_time=last_time,
        last_age_seconds=max(0.0, report.end_time - last_time) if last_time is not None else None,
        last_duration_seconds=took,
        seconds=seconds,
        share=share,
        bytes=round(sum(bytes_totals.values())) if bytes_totals else None,
    )


def _steps_at(q: JobQueries, rank: int, at: float) -> float | None:
    found = q.vector(f'max(ugro_train_steps_total{{$sel,rank="{rank}"}})', at)
    values = [float(s["value"][1]) for s in found if math.isfinite(float(s["value"][1]))]
    return values[0] if values else None
