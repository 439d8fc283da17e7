"""``make demo``: a monitored 2-rank torchrun of the reference trainer, read back from /metrics.

Starts torchrun, then scrapes both ranks' endpoints every few seconds and prints what Prometheus
would see: steps, the last loss, the exact mean loss and the token rate between two scrapes.
Ctrl-C stops the whole run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .config import DEFAULT_METRICS_BASE_PORT


def scrape(url: str) -> dict[str, float] | None:
    """The unlabelled samples of one endpoint, or None when it does not answer (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def describe(rank: int, now: dict[str, float], before: dict[str, float] | None) -> str:
    loss = now.get("ugro_train_loss_last")
    line = (
        f"  rank {rank}: step {now.get('ugro_train_steps_total', 0):.0f}"
        f"/{now.get('ugro_train_target_steps', 0):.0f}"
        f"  loss {'pending' if loss is None else format(loss, '.3f')}"
    )
    if before and now["ugro_train_loss_count"] > before.get("ugro_train_loss_count", 0):
        seconds = now["ugro_train_last_step_timestamp_seconds"] - before.get(
            "ugro_train_last_step_timestamp_seconds", now["ugro_train_start_time_seconds"]
        )
        mean = (now["ugro_train_loss_sum"] - before.get("ugro_train_loss_sum", 0)) / (
            now["ugro_train_loss_count"] - before.get("ugro_train_loss_count", 0)
        )
        tokens = now["ugro_train_tokens_total"] - before.get("ugro_train_tokens_total", 0)
        line += f"  mean loss since last look {mean:.3f}"
        if seconds > 0:
            line += f"  {tokens / seconds:,.0f} tokens/s"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ugro.trainer.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--port", type=int, default=DEFAULT_METRICS_BASE_PORT, help="base port")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between looks")
    args = parser.parse_args()

    urls = [f"http://127.0.0.1:{args.port + rank}/metrics" for rank in (0, 1)]
    env = {**os.environ, "UGRO_JOB_ID": "demo", "UGRO_METRICS_PORT": str(args.port)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "ugro.trainer.train", "--steps", str(args.steps), "--linger", "3",
    ]  # fmt: skip
    print(f"==> torchrun: 2 ranks, {args.steps} steps; /metrics at {urls[0]} and {urls[1]}")
    torchrun = subprocess.Popen(command, env=env, start_new_session=True)
    previous: list[dict[str, float] | None] = [None, None]
    try:
        while torchrun.poll() is None:
            time.sleep(args.every)
            looks = [scrape(url) for url in urls]
            if any(looks):
                print("==> scraped:")
            for rank, look in enumerate(looks):
                if look:
                    print(describe(rank, look, previous[rank]), flush=True)
                    previous[rank] = look
    except KeyboardInterrupt:
        print("\n==> stopping the run")
        os.killpg(torchrun.pid, signal.SIGTERM)
        torchrun.wait(timeout=30)
        return 130
    code = torchrun.wait()
    print(f"==> torchrun exited with code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
