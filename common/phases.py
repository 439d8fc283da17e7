"""The phases a training rank can be in, shared by the trainer (which marks them) and the
catalogue (whose rules compare ranks by them). Standard library only: ``ugro.trainer`` imports it.

A rank is always in exactly one phase. ``startup`` runs from its process's start until its
first ``step()``; after each ``step()`` it is in ``step`` (computing, not marked finer) until the
loop marks another phase. ``forward``, ``backward`` and ``optimizer`` are the parts of a step a
loop (or a framework callback) may mark; ``data``, ``checkpoint`` and ``evaluation`` are the
waits around it.
"""

from __future__ import annotations

STARTUP = "startup"
DATA = "data"
STEP = "step"
FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"
CHECKPOINT = "checkpoint"
EVALUATION = "evaluation"

PHASES = (STARTUP, DATA, STEP, FORWARD, BACKWARD, OPTIMIZER, CHECKPOINT, EVALUATION)

# Where each phase lies within one optimizer step, in the order a synchronous data-parallel
# step passes through them. When a job hangs, every healthy rank runs on to the next collective
# (the gradient all-reduce in ``backward``) and waits there; the rank they wait for is the one
# least far along: fewest steps, then the lowest place here. Checkpoints and evaluation happen
# between steps, before the next step's input is fetched.
PROGRESS_ORDER = {
    STARTUP: 0,
    CHECKPOINT: 1,
    EVALUATION: 1,
    DATA: 2,
    STEP: 3,
    FORWARD: 3,
    BACKWARD: 4,
    OPTIMIZER: 5,
}

# The phases whose time is productive: a step being computed.
PRODUCTIVE = (STEP, FORWARD, BACKWARD, OPTIMIZER)
