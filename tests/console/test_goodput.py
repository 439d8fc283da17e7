"""``ugro report``'s "Where the time went" and "Checkpoints", over a real Prometheus.

The first part feeds Prometheus a job written second by second (backfilled with ``promtool
tsdb create-blocks-from openmetrics``, so its numbers are known exactly): rank 0 runs once,
checkpoints twice and stalls in its forward pass for 22 s; rank 1 crashes, and torchrun starts
it again 5 s later. What the report must say follows from that timeline by the contract's
definitions, computed here independently of ``console/goodput.py``.

The end-to-end part runs the reference trainer with injected waits (``--data-delay``,
``--checkpoint-every``/``--checkpoint-delay``, ``--eval-every``/``--eval-delay``) against the
real Prometheus of ``AlertStack``: each rank's seconds per category are its own phase counters
as Prometheus holds them (they count from 0 at the process's start, so their last values are
their increase over the run), and at least the injected waits. A second run crashes and is
rerun by torchrun, and shows what the restart cost.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import yaml

from tests.support import wait_for
from tests.support.models import SMALL_MODEL
from tests.support.servers import server
from tests.support.stack import AlertStack
from tests.support.training import TrainingJob
from ugro.catalogue import goodput as definition
from ugro.common.ports import free_port
from ugro.common.processes import stop_process_group, wait_until_ready
from ugro.console import cli, goodput
from ugro.launcher.targets import RankEndpoint

JOB = "gp-backfill"
OLD_JOB = "gp-no-phases"  # telemetry that predates phases: steps, no phase series
STALL_THRESHOLD = 8  # seconds without a step before the written stalled condition holds (a
# checkpoint or an evaluation and the next step take at most 7)
STEP = ["data", "forward", "backward", "optimizer"]  # one second each: a 4 s step
BYTES_PER_CHECKPOINT = 1000
# Where to keep the sections of the real reports below, when set (for a change's notes).
CAPTURE = os.environ.get("UGRO_REPORT_CAPTURE")


# -- the arithmetic, without a server --------------------------------------------------------


def test_counter_total_adds_the_value_before_each_reset():
    assert goodput.counter_total([]) == 0
    assert goodput.counter_total([(1, 2.0), (2, 5.0)]) == 5.0
    assert goodput.counter_total([(1, 2.0), (2, 5.0), (3, 1.0), (4, 4.0)]) == 9.0


def test_stall_episodes_are_told_apart_by_the_last_step_they_imply():
    samples = [(100.0 + i, 6.0 + i) for i in range(5)]  # last step at 94, seen 100..104
    samples += [(200.0, 7.0), (201.0, 8.0)]  # another stall, last step at 193
    episodes = goodput.stall_episodes(samples)
    assert [(e.last_step, e.seconds, e.first_seen) for e in episodes] == [
        (94.0, 10.0, 100.0),
        (193.0, 8.0, 200.0),
    ]


def test_account_takes_stalls_and_redone_work_out_of_their_phases():
    phase_seconds = {"startup": 10.0, "forward": 30.0, "step": 20.0, "data": 5.0}
    time = goodput.account(
        3, phase_seconds, 70.0, stalls=[("forward", 12.0), (None, 4.0)], redone=[{"data": 2.0}]
    )
    assert time.seconds == {
        "productive": 50.0 - 12.0 - 4.0,
        "data": 3.0,
        "checkpoint": 0.0,
        "evaluation": 0.0,
        "startup": 10.0,
        "stalled": 16.0,
        "restarts": 5.0 + 2.0,  # 5 s without a process, 2 s of redone input
    }
    assert sum(time.seconds.values()) == time.wall_seconds == 70.0


# -- a job written second by second ---------------------------------------------------------


@dataclass
class Life:
    """One process of a rank: its phase in each second from its start, and what it did."""

    started: int  # seconds after T0
    phases: list[str] = field(default_factory=list)
    step_ends: list[int] = field(default_factory=list)  # seconds after T0
    checkpoint_ends: list[tuple[int, int]] = field(default_factory=list)  # (end, duration)
    ends: int = 0  # its last scrape, seconds after T0

    def run(self, phase: str, seconds: int) -> None:
        self.phases += [phase] * seconds

    def steps(self, count: int) -> None:
        for _ in range(count):
            self.phases += STEP
            self.step_ends.append(self.started + len(self.phases))

    def checkpoint(self, seconds: int) -> None:
        self.run("checkpoint", seconds)
        self.checkpoint_ends.append((self.started + len(self.phases), seconds))

    def counted(self, at: int) -> Counter:
        """Each phase's seconds at ``at`` (seconds after T0)."""
        return Counter(self.phases[: at - self.started])


def rank0() -> Life:
    life = Life(started=0, ends=100)
    life.run("startup", 5)  # startup runs to the end of the first step
    life.step_ends.append(5)
    life.steps(5)  # to 25
    life.checkpoint(3)  # to 28
    life.steps(5)  # to 48
    life.run("evaluation", 2)  # to 50
    life.steps(2)  # to 58: the last step before the stall
    life.run("data", 1)
    life.run("forward", 20)  # hung in the forward pass, 59 to 79
    life.run("backward", 1)
    life.run("optimizer", 1)
    life.step_ends.append(81)
    life.steps(4)  # to 97
    life.checkpoint(3)  # to 100
    return life


def rank1() -> list[Life]:
    first = Life(started=0, ends=49)  # crashes at 49.5: its last scrape is at 49
    first.run("startup", 6)
    first.step_ends.append(6)
    first.steps(5)  # to 26
    first.checkpoint(3)  # to 29
    first.steps(4)  # to 45: the last step, 16 s after the checkpoint
    first.run("data", 2)
    first.run("forward", 2)
    second = Life(started=54, ends=100)  # torchrun restarts it 4.5 s later
    second.run("startup", 4)
    second.step_ends.append(58)
    second.steps(10)  # to 98
    second.run("evaluation", 2)  # to 100
    return [first, second]


def openmetrics(t0: int) -> str:
    """Every scrape of both ranks (1 s apart) and the stalled condition's evaluations."""
    lines = []

    def add(name: str, rank: int, value: float, at: int, job: str = JOB, **labels: str) -> None:
        extra = "".join(f',{k}="{v}"' for k, v in labels.items())
        lines.append(f'{name}{{job_id="{job}",rank="{rank}"{extra}}} {value} {t0 + at}')

    for at in range(1, 31):
        add("ugro_train_start_time_seconds", 0, t0, at, job=OLD_JOB)
        add("ugro_train_steps_total", 0, at, at, job=OLD_JOB)
        add(goodput.LAST_STEP, 0, t0 + at, at, job=OLD_JOB)

    for rank, lives in ((0, [rank0()]), (1, rank1())):
        for life in lives:
            for at in range(life.started + 1, life.ends + 1):
                for phase, seconds in sorted(life.counted(at).items()):
                    add(goodput.PHASE_SECONDS, rank, seconds, at, phase=phase)
                now = life.phases[min(at, life.ends - 1) - life.started]  # in [at, at + 1)
                add(goodput.PHASE, rank, 1, at, phase=now)
                add(goodput.PROCESS_START, rank, t0 + life.started, at)
                add("ugro_train_start_time_seconds", rank, t0 + life.started + 0.5, at)
                steps = [s for s in life.step_ends if s <= at]
                add("ugro_train_steps_total", rank, len(steps), at)
                add("ugro_train_target_steps", rank, 1000, at)
                if steps:
                    add(goodput.LAST_STEP, rank, t0 + steps[-1], at)
                done = [(end, took) for end, took in life.checkpoint_ends if end <= at]
                if done:
                    add(goodput.CHECKPOINTS, rank, len(done), at)
                    add(goodput.LAST_CHECKPOINT, rank, t0 + done[-1][0], at)
                    add(goodput.LAST_CHECKPOINT_DURATION, rank, done[-1][1], at)
                    if rank == 0:  # only rank 0 writes
                        add(goodput.CHECKPOINT_BYTES, rank, BYTES_PER_CHECKPOINT * len(done), at)
                # The condition, as the rule evaluates it on this scrape.
                if steps and at - steps[-1] > STALL_THRESHOLD:
                    add(goodput.conditions.STALLED, rank, at - steps[-1], at)
    # OpenMetrics wants each metric's samples together.
    lines.sort(key=lambda line: line.split("{", 1)[0])
    return "\n".join(lines) + "\n# EOF\n"


@dataclass
class Backfilled:
    url: str
    t0: int


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    """Prometheus over blocks holding the written job, scraping nothing."""
    directory = tmp_path_factory.mktemp("goodput-backfill")
    t0 = int(time.time()) - 600
    source = directory / "job.om"
    source.write_text(openmetrics(t0))
    data = directory / "data"
    subprocess.run(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}}))
    port = free_port()
    log = directory / "prometheus.log"
    process = server("prometheus").start(
        [
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log,
        writable=[directory],
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/-/ready", 30, process=process, what="Prometheus")
        yield Backfilled(f"http://127.0.0.1:{port}", t0)
    finally:
        process.stop()


@pytest.fixture
def no_launcher_records(tmp_path, monkeypatch):
    monkeypatch.setenv("UGRO_STATE_DIR", str(tmp_path / "no-launcher-records"))


def report_json(capsys, url: str, job: str) -> dict:
    code = cli.main(["--prometheus", url, "report", job, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def expected_rank0() -> dict[str, float]:
    phases = Counter(rank0().phases)
    stalled = 80 - 58  # the condition's last value: from the last step to the last evaluation
    productive = sum(phases[p] for p in ("step", "forward", "backward", "optimizer"))
    return {
        "productive": productive - stalled,  # taken out of forward, where it hung
        "data": phases["data"],
        "checkpoint": 6,
        "evaluation": 2,
        "startup": 5,
        "stalled": stalled,
        "restarts": 0,
    }


def expected_rank1() -> dict[str, float]:
    first, second = rank1()
    phases = first.counted(first.ends) + second.counted(second.ends)
    gap = 100 - sum(phases.values())  # from its last scrape at 49 to the restart at 54
    # Redone: from the checkpoint at 29 to the last step at 45, four whole 4 s steps.
    redone = first.counted(45) - first.counted(29)
    assert redone == Counter({"data": 4, "forward": 4, "backward": 4, "optimizer": 4})
    productive = sum(phases[p] for p in ("step", "forward", "backward", "optimizer"))
    return {
        "productive": productive - 12,
        "data": phases["data"] - 4,
        "checkpoint": 3,
        "evaluation": 2,
        "startup": 10,
        "stalled": 0,
        "restarts": gap + 16,
    }


def test_where_the_time_went_follows_the_timeline(backfilled, no_launcher_records, capsys):
    document = report_json(capsys, backfilled.url, JOB)
    accounting = document["goodput"]
    assert accounting["categories"] == list(definition.CATEGORIES)
    ranks = {r["rank"]: r for r in accounting["ranks"]}
    for rank, expected in ((0, expected_rank0()), (1, expected_rank1())):
        assert ranks[rank]["wall_seconds"] == pytest.approx(100, abs=1e-9)
        assert ranks[rank]["seconds"] == pytest.approx(expected, abs=1e-9), rank
        assert ranks[rank]["shares"] == pytest.approx(
            {c: s / 100 for c, s in expected.items()}, abs=1e-9
        )
    assert ranks[0]["incarnations"] == 1 and ranks[1]["incarnations"] == 2
    assert ranks[0]["stall_episodes"] == 1 and ranks[1]["stall_episodes"] == 0
    job = accounting["job"]
    assert job["wall_seconds"] == pytest.approx(100)
    for category in definition.CATEGORIES:
        mean = (expected_rank0()[category] + expected_rank1()[category]) / 2
        assert job["seconds"][category] == pytest.approx(mean, abs=1e-9)
        assert job["shares"][category] == pytest.approx(mean / 100, abs=1e-9)


def test_checkpoints_follow_the_timeline(backfilled, no_launcher_records, capsys):
    checkpoints = report_json(capsys, backfilled.url, JOB)["checkpoints"]
    t0 = backfilled.t0
    seconds = (expected_rank0()["checkpoint"] + expected_rank1()["checkpoint"]) / 2
    assert checkpoints == {
        "count": 2,  # rank 0's; rank 1's restart lost count of nothing: it took one
        "steps_between_mean": 18 / 2,  # 18 steps done by the last checkpoint, 2 checkpoints
        "last_time": t0 + 100,
        "last_age_seconds": 0.0,  # it completed after the last step (t0 + 98)
        "last_duration_seconds": 3.0,
        "seconds": pytest.approx(seconds),
        "share": pytest.approx(seconds / 100),
        "bytes": 2 * BYTES_PER_CHECKPOINT,
    }


def test_text_report_shows_both_sections(backfilled, no_launcher_records, capsys):
    code = cli.main(["--prometheus", backfilled.url, "report", JOB])
    out, err = capsys.readouterr()
    assert code == 0, err
    section = out.split("\nWhere the time went\n", 1)[1].split("\nCheckpoints\n", 1)[0]
    job = {c: (expected_rank0()[c] + expected_rank1()[c]) / 2 for c in definition.CATEGORIES}
    for category, seconds in job.items():
        line = next(ln for ln in section.splitlines() if ln.strip().startswith(category))
        assert f"{seconds:.1f} %" in line and f"{seconds:.1f} s" in line, line  # wall: 100 s
    checkpoints = out.split("\nCheckpoints\n", 1)[1].split("\nRanks\n", 1)[0]
    assert re.search(r"^  count +2, every 9\.0 steps on average$", checkpoints, re.M)
    assert re.search(r"^  last +.* UTC, at the end of the run, took 3\.0 s$",
                     checkpoints, re.M)  # fmt: skip
    assert re.search(r"^  written +2\.0 KiB$", checkpoints, re.M)
    # Per rank: the shares of each rank's own wall time (100 s).
    row = next(line for line in section.splitlines() if line.startswith("1 "))
    cells = [f"{expected_rank1()[c]:.1f} %" for c in definition.CATEGORIES]
    assert re.fullmatch(r"1 +1 min 40 s +" + " +".join(map(re.escape, cells)), row), row


def test_a_job_without_phases_or_checkpoints_says_so(backfilled, no_launcher_records, capsys):
    """Telemetry older than phases: one line each instead of the sections' figures."""
    document = report_json(capsys, backfilled.url, OLD_JOB)
    assert document["goodput"] is None and document["checkpoints"] is None
    code = cli.main(["--prometheus", backfilled.url, "report", OLD_JOB])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "\nWhere the time went\n  no phase series recorded" in out
    assert "\nCheckpoints\n  no checkpoints recorded\n" in out


# -- real runs with injected waits -----------------------------------------------------------

WAITS_JOB, RESTART_JOB = "gp-waits", "gp-restart"
WAIT_STEPS = 16
DATA_DELAY, EVAL_EVERY, EVAL_DELAY, CHECKPOINT_EVERY, CHECKPOINT_DELAY = 0.6, 4, 0.8, 8, 1.0
WAITS_ARGS = [
    *SMALL_MODEL,
    f"--steps={WAIT_STEPS}",
    f"--data-delay={DATA_DELAY}",
    f"--eval-every={EVAL_EVERY}",
    f"--eval-delay={EVAL_DELAY}",
    f"--checkpoint-every={CHECKPOINT_EVERY}",
    f"--checkpoint-delay={CHECKPOINT_DELAY}",
    "--linger=3",
]
# Besides its injected sleep, a wait does milliseconds of work: slicing a batch, evaluating two
# small batches, torch.save of a model of a few hundred kB and a barrier with a rank that left
# the same evaluation moments before. 0.5 s per wait leaves room for a loaded 2-core machine
# and is still below every injected delay: a category that counted one wait too many (or too
# few) fails.
SLACK_PER_WAIT = 0.5
# Waits per rank: the first step's data wait counts in startup (which ends with the first step).
DATA_WAITS = WAIT_STEPS - 1
EVALUATIONS = WAIT_STEPS // EVAL_EVERY
CHECKPOINTS_TAKEN = WAIT_STEPS // CHECKPOINT_EVERY
RESTART_CRASH_AT, RESTART_CHECKPOINT_EVERY, RESTART_DATA_DELAY = 18, 10, 0.3
# The runs start torch in every process: tens of seconds each on a loaded 2-core machine.
RUN_TIMEOUT = 600


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = AlertStack(tmp_path_factory.mktemp("goodput-runs"))
    yield stack
    stack.close()


def own_phase_seconds(stack: AlertStack, job_id: str, rank: int) -> dict[str, float]:
    """A rank's phase counters as Prometheus last scraped them."""
    found = stack.query(
        f'last_over_time({goodput.PHASE_SECONDS}{{job_id="{job_id}",rank="{rank}"}}[10m])'
    )
    return {s["metric"]["phase"]: float(s["value"][1]) for s in found}


@pytest.fixture(scope="module")
def waits_run(stack):
    job = TrainingJob(stack, WAITS_JOB, WAITS_ARGS)
    try:
        assert job.wait(timeout=240) == 0, job.log.read_text()[-3000:]
    finally:
        job.stop()

    def final_values_held() -> bool:
        steps = stack.query(f'last_over_time(ugro_train_steps_total{{job_id="{WAITS_JOB}"}}[5m])')
        up = stack.query(f'up{{job_id="{WAITS_JOB}"}} == 1')
        return not up and sorted(float(s["value"][1]) for s in steps) == [WAIT_STEPS] * 2

    wait_for(final_values_held, 30, "Prometheus to hold the final values, the job ended")
    return job


@pytest.mark.timeout(RUN_TIMEOUT)
def test_injected_waits_land_in_their_categories(stack, waits_run, no_launcher_records, capsys):
    document = report_json(capsys, stack.prometheus_url, WAITS_JOB)
    ranks = document["goodput"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        own = own_phase_seconds(stack, WAITS_JOB, rank["rank"])
        assert rank["phase_seconds"] == own  # exactly what Prometheus holds
        grouped = {
            category: sum(own.get(p, 0.0) for p in members)
            for category, members in definition.PHASES_OF.items()
        }
        # No stall (stall_min_seconds is 120) and no restart: the phase categories, as counted.
        assert rank["seconds"] == {**grouped, "stalled": 0.0, "restarts": 0.0}
        assert rank["wall_seconds"] == pytest.approx(sum(own.values()), rel=1e-12)
        assert rank["incarnations"] == 1 and rank["stall_episodes"] == 0
        seconds = rank["seconds"]
        for category, waits, delay in (
            ("data", DATA_WAITS, DATA_DELAY),
            ("evaluation", EVALUATIONS, EVAL_DELAY),
            ("checkpoint", CHECKPOINTS_TAKEN, CHECKPOINT_DELAY),
        ):
            injected = waits * delay
            assert injected <= seconds[category] < injected + waits * SLACK_PER_WAIT, (
                rank["rank"], category, seconds[category], injected,
            )  # fmt: skip
        assert seconds["productive"] > 0 and seconds["startup"] > 0
    job = document["goodput"]["job"]
    for category in definition.CATEGORIES:
        mean = sum(r["seconds"][category] for r in ranks) / 2
        assert job["seconds"][category] == pytest.approx(mean, rel=1e-12)
    assert sum(job["shares"].values()) == pytest.approx(1.0, rel=1e-12)


def test_checkpoints_of_a_run_are_counted_exactly(stack, waits_run, no_launcher_records, capsys):
    document = report_json(capsys, stack.prometheus_url, WAITS_JOB)
    checkpoints = document["checkpoints"]
    assert checkpoints["count"] == CHECKPOINTS_TAKEN
    # The last checkpoint follows step 16 and an evaluation of 0.8 s: a scrape saw step 16.
    assert checkpoints["steps_between_mean"] == CHECKPOINT_EVERY
    assert checkpoints["last_duration_seconds"] >= CHECKPOINT_DELAY
    # The last checkpoint is the job's last act: it completed after the last step.
    assert checkpoints["last_time"] >= document["time"]["end"]
    assert checkpoints["last_age_seconds"] == 0.0
    written = stack.query(
        f'last_over_time({goodput.CHECKPOINT_BYTES}{{job_id="{WAITS_JOB}"}}[10m])'
    )
    assert [s["metric"]["rank"] for s in written] == ["0"]  # only rank 0 writes
    assert checkpoints["bytes"] == float(written[0]["value"][1]) > 0
    assert checkpoints["seconds"] == document["goodput"]["job"]["seconds"]["checkpoint"]
    assert checkpoints["share"] == document["goodput"]["job"]["shares"]["checkpoint"]


def test_capture_the_sections_of_a_real_report(stack, waits_run, no_launcher_records, capsys):
    """The text of both sections, as the issue's closing note shows them."""
    code = cli.main(["--prometheus", stack.prometheus_url, "report", WAITS_JOB])
    out, err = capsys.readouterr()
    assert code == 0, err
    sections = "\nWhere the time went\n" + out.split("\nWhere the time went\n", 1)[1]
    sections = sections.split("\nRanks\n", 1)[0].strip("\n") + "\n"
    assert "\nCheckpoints\n  count        2, every 8.0 steps on average\n" in sections
    if CAPTURE:
        pathlib.Path(CAPTURE).write_text(f"$ ugro report {WAITS_JOB}\n...\n{sections}")


def start_with_restarts(stack: AlertStack, job_id: str, args: list[str], log) -> subprocess.Popen:
    """The reference trainer as one rank under ``torchrun --max-restarts 1``, registered as
    ``TrainingJob`` registers its ranks (it starts torchrun without restarts)."""
    base = free_port()
    stack.targets.register_job(job_id, [RankEndpoint("127.0.0.1", base, 0, "node-a")])
    # Started once Prometheus scrapes the target, so it sees the first incarnation's steps.
    wait_for(lambda: stack.query(f'up{{job_id="{job_id}"}}'), 60, "the target scraped")
    env = {
        **os.environ,
        "UGRO_JOB_ID": job_id,
        "UGRO_METRICS_PORT": str(base),
        "UGRO_METRICS_ADDR": "127.0.0.1",
        "UGRO_NODE": "node-a",
        "UGRO_REGISTERED_TARGET": "1",
        "OMP_NUM_THREADS": "1",
    }
    # One process: a restarted gloo group does not always connect again on a loaded machine
    # (the rerun's rank 1 gave up connecting to rank 0 before it listened), and what a
    # restart costs is the same for every rank.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
        "--max-restarts=1", "-m", "ugro.trainer.train", "--log-every=1000000", *args,
    ]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


@pytest.fixture(scope="module")
def restart_run(stack):
    log = stack.workdir / f"{RESTART_JOB}.log"
    process = start_with_restarts(
        stack,
        RESTART_JOB,
        [
            *SMALL_MODEL,
            "--steps=1000",
            f"--data-delay={RESTART_DATA_DELAY}",
            f"--checkpoint-every={RESTART_CHECKPOINT_EVERY}",
            "--fault-rank=0",
            f"--crash-at={RESTART_CRASH_AT}",  # in every incarnation: the rerun crashes too
        ],
        log,
    )
    try:
        code = process.wait(timeout=300)
    finally:
        stop_process_group(process, grace=10.0)
    assert code != 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count(f"injected crash at step {RESTART_CRASH_AT}") == 2, text[-3000:]

    def both_incarnations_seen() -> bool:
        starts = stack.query(
            f'changes({goodput.PROCESS_START}{{job_id="{RESTART_JOB}"}}[10m]) >= 1'
        )
        return len(starts) == 1 and not stack.query(f'up{{job_id="{RESTART_JOB}"}} == 1')

    wait_for(both_incarnations_seen, 30, "Prometheus to have seen both incarnations end")
    return log


@pytest.mark.timeout(RUN_TIMEOUT)
def test_a_restart_shows_as_restarts(stack, restart_run, no_launcher_records, capsys):
    document = report_json(capsys, stack.prometheus_url, RESTART_JOB)
    [rank] = document["goodput"]["ranks"]
    assert rank["incarnations"] == 2
    seconds, phase_seconds = rank["seconds"], sum(rank["phase_seconds"].values())
    # torchrun restarts within a second, and a process's start time (psutil's, from the
    # kernel's whole-second boot time) is known to a second: the time without a process may
    # show as 0, never less.
    without_process = rank["wall_seconds"] - phase_seconds
    assert without_process >= 0
    # The first incarnation redid the steps since its checkpoint at step 10: at least one was
    # scraped (steps 11 to 17 take at least 7 × 0.3 s, and Prometheus scrapes every second),
    # and a step lasts at least its injected data wait.
    assert seconds["restarts"] > without_process + RESTART_DATA_DELAY
    assert sum(seconds.values()) == pytest.approx(rank["wall_seconds"], rel=1e-9)
    assert rank["shares"]["restarts"] > 0
    assert document["goodput"]["job"]["shares"]["restarts"] == rank["shares"]["restarts"]
    code = cli.main(["--prometheus", stack.prometheus_url, "report", RESTART_JOB])
    out, _ = capsys.readouterr()
    assert code == 0
    section = out.split("\nWhere the time went\n", 1)[1].split("\nCheckpoints\n", 1)[0]
    assert re.search(r"^  restarts +[1-9][0-9.]* % ", section, re.M), section
    if CAPTURE:
        with open(CAPTURE, "a") as capture:
            capture.write(
                f"\n$ ugro report {RESTART_JOB}   (one rank; it crashes at step "
                f"{RESTART_CRASH_AT}, torchrun --max-restarts 1 reruns it)\n\n"
                f"Where the time went\n{section}"
            )
