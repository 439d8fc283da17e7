"""Where a job's time went: the goodput categories, defined once for the recording rules (the
dashboard's "Where the time went" row) and ``ugro report``.

A rank's wall time is split by the phase it was in (``ugro_train_phase_seconds_total``: the sum
over phases is the rank's process lifetime). Five categories are phases, grouped:

* ``productive`` — completing steps (``ugro.common.phases.PRODUCTIVE``);
* ``data``, ``checkpoint``, ``evaluation`` — waiting for input, saving, evaluating;
* ``startup`` — from the process's start to the end of its first step.

Two are not phases and are taken out of the phases they were counted in:

* ``stalled`` — per stall episode of a rank, the largest value its stalled condition
  (``job_rank:ugro_train_stalled:condition``) reached: the seconds from its last step to the
  end of the stall. A hung rank's phase counter keeps running, so those seconds are taken out
  of the phase the rank hung in.
* ``restarts`` — wall time with no live process (between a worker's exit and torchrun's
  restart: wall time minus the sum of phase seconds), plus, for each incarnation that was
  restarted, the work it redid: from its last checkpoint (or its first step) to its last step,
  taken out of the phases it was counted in.

The recording rules can only group phases (a 5-minute rate knows neither when a stall ends nor
whether an incarnation will be restarted); ``ugro report`` applies the two derived categories
over a finished run.
"""

from __future__ import annotations

from ugro.common import phases

PRODUCTIVE = "productive"
DATA = "data"
CHECKPOINT = "checkpoint"
EVALUATION = "evaluation"
STARTUP = "startup"
STALLED = "stalled"
RESTARTS = "restarts"

# Every category, in the order reports and dashboards show them.
CATEGORIES = (PRODUCTIVE, DATA, CHECKPOINT, EVALUATION, STARTUP, STALLED, RESTARTS)

# The categories that are groups of phases, and their phases.
PHASES_OF: dict[str, tuple[str, ...]] = {
    PRODUCTIVE: phases.PRODUCTIVE,
    DATA: (phases.DATA,),
    CHECKPOINT: (phases.CHECKPOINT,),
    EVALUATION: (phases.EVALUATION,),
    STARTUP: (phases.STARTUP,),
}

# The categories taken out of the phase categories (see the module's docstring).
DERIVED = (STALLED, RESTARTS)


def category_of(phase: str) -> str:
    """The category a phase's seconds count in (before stalls and restarts are taken out)."""
    for category, members in PHASES_OF.items():
        if phase in members:
            return category
    raise ValueError(f"unknown phase {phase!r}; known: {', '.join(phases.PHASES)}")


def phase_regex(category: str) -> str:
    """A PromQL regex matching the ``phase`` label values of a phase category."""
    return "|".join(PHASES_OF[category])
