"""Seconds from a non-finite loss in a training rank to Slack receiving the notification.

The real path, as in tests/alerts/test_end_to_end.py: the reference trainer (2 ranks on CPU
under torchrun) → Prometheus (1 s scrape and evaluation) → the rules of alerts/rules.yml →
Alertmanager (1 s group wait) → a local HTTP server standing in for Slack's webhook. Each run
is a new job in the same stack; rank 1 poisons its loss for 5 steps from step 200 and prints
the wall-clock time it did so. A run's latency is the arrival time of the first Slack post
for that job's ``TrainingNonFiniteValues`` minus that printed time (one clock: same machine).

Production intervals are 5 s scrape and evaluation and a 10 s group wait; alerts/README.md
gives that budget (~21 s worst case).

    python benchmarks/alert_latency.py --runs 5     # about 20 s a run on 2 cores

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.support.stack import AlertStack
from tests.support.training import TrainingJob

INJECTED = re.compile(r"injected non-finite loss at step \d+ \(unix time ([0-9.]+)\)")
TRAINER_ARGS = [
    *("--batch-size", "8", "--context", "32", "--width", "64", "--depth", "1"),
    *("--steps", "1000000", "--fault-rank", "1"),
    *("--nonfinite-loss-from", "200", "--nonfinite-loss-steps", "5"),
]


def wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def one_run(stack: AlertStack, job_id: str) -> float:
    job = TrainingJob(stack, job_id, TRAINER_ARGS)
    try:
        injected_at = float(
            wait(lambda: INJECTED.search(job.log.read_text()), 120, "the injection").group(1)
        )

        def first_post() -> float | None:
            for post in stack.slack.posts:
                text = json.dumps(post.payload)
                if "TrainingNonFiniteValues" in text and f"job {job_id}" in text:
                    return post.at
            return None

        notified_at = wait(first_post, 120, f"the Slack post for {job_id}")
        return notified_at - injected_at
    finally:
        job.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="jobs to inject into (default 5)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: expected >= 1")

    latencies = []
    with tempfile.TemporaryDirectory(prefix="ugro-alert-latency-") as workdir:
        stack = AlertStack(pathlib.Path(workdir))
        try:
            for run in range(args.runs):
                latency = one_run(stack, f"latency-{run}")
                latencies.append(latency)
                print(f"run {run + 1}/{args.runs}: {latency:.2f} s", flush=True)
        finally:
            stack.close()
    print(
        json.dumps(
            {
                "benchmark": "alert_latency",
                "fault": "non-finite loss on rank 1 of 2",
                "intervals": {"scrape": "1s", "evaluation": "1s", "group_wait": "1s"},
                "runs": len(latencies),
                "median_s": round(statistics.median(latencies), 2),
                "max_s": round(max(latencies), 2),
                "min_s": round(min(latencies), 2),
                "latencies_s": [round(x, 2) for x in latencies],
            }
        )
    )


if __name__ == "__main__":
    main()
