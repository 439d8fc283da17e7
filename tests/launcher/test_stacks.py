"""``ugro-launch stacks``: py-spy dumps of every rank, through the agents of real SSH nodes.

The job is the reference trainer under real torchrun on the two namespace nodes (see
netns.py), one rank hung with ``--hang-at``; the others wait for it in the step's collective.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
from types import SimpleNamespace

import psutil
import pytest
import yaml

from ugro.console.servers import Unreachable
from ugro.launcher.agent.preflight import preflight
from ugro.launcher.agent.stacks import find_py_spy
from ugro.launcher.inventory import Node
from ugro.launcher.launch import preflight_table
from ugro.launcher.stacks import group_ranks, rank_ranges
from ugro.launcher.stall_dumps import StallDumper

from ..support import wait_for
from ..support.stack import TEST_THRESHOLDS, AlertStack
from .test_agent import Jobs, agent_json
from .test_launch import SMALL_TRAINER, Launcher

AGENT = ["-m", "ugro.launcher.agent"]
HUNG_RANK = 1
# sshd's default PATH for root (Debian), which a command run over SSH gets.
SSHD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HUNG_JOB = [*SMALL_TRAINER, "--hang-at=3", f"--fault-rank={HUNG_RANK}"]


def python_without_py_spy(tmp_path: pathlib.Path) -> pathlib.Path:
    """A Python of this virtual environment, but in a bin/ without py-spy beside it.

    A virtual environment of its own (pyvenv.cfg) that shares this one's site-packages, so
    ugro and torch import as here; sshd's PATH holds no py-spy either.
    """
    root = tmp_path / "venv-without-py-spy"
    (root / "bin").mkdir(parents=True)
    shutil.copy(pathlib.Path(sys.prefix) / "pyvenv.cfg", root / "pyvenv.cfg")
    (root / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    purelib = pathlib.Path(sysconfig.get_paths()["purelib"])
    site_packages = root / purelib.relative_to(sys.prefix)
    site_packages.parent.mkdir(parents=True)
    site_packages.symlink_to(purelib)
    # Nor may py-spy be on the PATH that sshd and these tests give the agent.
    assert shutil.which("py-spy", path=SSHD_PATH) is None, "py-spy is installed system-wide"
    return root / "bin" / "python"


def node_workdir(launcher) -> pathlib.Path:
    """Where the nodes keep job files (the nodes share this machine's filesystem)."""
    return pathlib.Path(yaml.safe_load(launcher.inventory.read_text())["defaults"]["workdir"])


# -- grouping ---------------------------------------------------------------------------------


def _rank(node: str, rank: int, *functions: str) -> dict:
    frames = [{"function": name, "file": "/x/train.py", "line": 1} for name in functions]
    return {"node": node, "rank": rank, "pid": 100 + rank, "threads": [
        {"name": "Thread-1", "main": False, "frames": [{"function": "poll"}]},
        {"name": "MainThread", "main": True, "frames": frames},
    ]}  # fmt: skip


def test_ranks_with_the_same_main_thread_stack_form_one_group_largest_first():
    groups = group_ranks(
        [
            _rank("node-a", 0, "main", "allreduce"),
            _rank("node-a", 1, "main", "hang"),
            _rank("node-b", 2, "main", "allreduce"),
            _rank("node-b", 3, "main", "allreduce"),
        ]
    )
    assert [(g["ranks"], g["nodes"], g["odd_one_out"]) for g in groups] == [
        ([0, 2, 3], ["node-a", "node-b"], False),
        ([1], ["node-a"], True),
    ]
    assert [frame["function"] for frame in groups[1]["frames"]] == ["main", "hang"]
    # Two ranks that differ from each other: neither is singled out.
    pair = group_ranks([_rank("node-a", 0, "main", "a"), _rank("node-a", 1, "main", "b")])
    assert [g["odd_one_out"] for g in pair] == [False, False]


def test_rank_ranges_are_compact():
    assert rank_ranges([3, 0, 2]) == "0,2-3"
    assert rank_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert rank_ranges([4]) == "4"


# -- the agent's verb ---------------------------------------------------------------------------

# A stand-in for torchrun: two "ranks" with RANK in their environment; rank 1 has a child of its
# own (a data-loader worker), which inherits RANK and is not a rank.
FAKE_TORCHRUN = """
import os, subprocess, sys, time
worker = (
    "import subprocess, sys, time\\n"
    "def wait_here():\\n"
    "    time.sleep(300)\\n"
    "if sys.argv[1] == '1':\\n"
    "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\\n"
    "wait_here()\\n"
)
for rank in (0, 1):
    environment = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank)}
    subprocess.Popen([sys.executable, "-c", worker, str(rank)], env=environment)
time.sleep(300)
"""


@pytest.fixture
def jobs(tmp_path: pathlib.Path):
    jobs = Jobs(tmp_path / "work")
    yield jobs
    jobs.kill_all()


def test_the_agent_dumps_each_rank_below_torchrun_and_no_child_of_a_rank(jobs):
    started = jobs.python("fake", FAKE_TORCHRUN)
    assert started["state"] == "started", started
    leader = psutil.Process(started["pid"])

    def both_waiting() -> dict | None:
        answer = agent_json("stacks", *jobs.options("fake"))
        functions = [
            [frame["function"] for frame in rank["threads"][0]["frames"]]
            for rank in answer["ranks"]
            if rank.get("threads")
        ]
        return answer if functions == [["<module>", "wait_here"]] * 2 else None

    answer = wait_for(both_waiting, 60, "both ranks in wait_here")
    assert answer["state"] == "running" and answer["error"] is None
    assert answer["py_spy"] == find_py_spy()
    children = sorted(child.pid for child in leader.children())
    assert [(r["rank"], r["local_rank"], r["pid"]) for r in answer["ranks"]] == [
        (0, 0, children[0]), (1, 1, children[1])
    ]  # fmt: skip
    for rank in answer["ranks"]:
        (thread,) = rank["threads"]
        assert thread["main"] is True and thread["thread_id"] == rank["pid"]
        assert thread["frames"][-1] == {"function": "wait_here", "file": "<string>", "line": 3}

    jobs.stop("fake", grace=5)
    ended = agent_json("stacks", *jobs.options("fake"))
    assert ended["ranks"] == []
    assert ended["error"].startswith("the job is not running here (")


# -- preflight ----------------------------------------------------------------------------------


def test_preflight_has_no_warning_where_py_spy_can_attach(tmp_path):
    assert find_py_spy() == str(pathlib.Path(sys.executable).parent / "py-spy")
    report = preflight(str(tmp_path))
    assert report["warnings"] == []
    assert report["problems"] == []


def test_preflight_warns_without_failing_when_py_spy_is_missing(tmp_path):
    python = python_without_py_spy(tmp_path)
    done = subprocess.run(
        [str(python), *AGENT, "preflight", f"--workdir={tmp_path / 'w'}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": SSHD_PATH},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["problems"] == []
    assert report["warnings"] == [
        f"py-spy is not installed beside {python} nor on PATH: {python.parent / 'pip'} install "
        "py-spy; `ugro-launch stacks` cannot dump ranks here"
    ]


def test_the_launch_shows_a_preflight_warning_without_failing_the_node():
    node = Node("gpu-a", "10.0.0.1", 22, None, None, None)
    result = {"problems": [], "warnings": ["py-spy is missing"], "torch_version": "2.13.0"}
    table = preflight_table({"gpu-a": result}, [node])
    row = table.splitlines()[1]
    assert row.split()[2] == "ok"
    assert row.endswith("torch 2.13.0; warning: py-spy is missing")


def test_a_process_py_spy_may_not_attach_to_is_explained(tmp_path):
    """py-spy run as another user than the process's (here: nobody, against root's)."""
    with subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    ) as sleeper:
        try:
            assert sleeper.stdout.readline() == "ready\n"
            code = (
                "import json\n"
                "from ugro.launcher.agent.stacks import dump_process, find_py_spy\n"
                f"print(json.dumps(dump_process({sleeper.pid}, find_py_spy())))\n"
            )
            done = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                 sys.executable, "-c", code],
                capture_output=True, text=True, timeout=60, cwd=tmp_path,
            )  # fmt: skip
        finally:
            sleeper.kill()
    assert done.returncode == 0, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error.startswith(f"py-spy may not attach to pid {sleeper.pid} (permission denied): ")
    assert "run the job and the agent as the same user" in error
    assert "CAP_SYS_PTRACE" in error


# -- ugro-launch stacks on two nodes ------------------------------------------------------------


def _groups_when_settled(launcher, job_id: str) -> dict:
    """The --json answer once the hung rank is alone and the three others wait together."""

    def settled() -> dict | None:
        done = launcher("stacks", job_id, "--json", timeout=120)
        if done.returncode != 0:
            return None
        answer = json.loads(done.stdout)
        sizes = [len(group["ranks"]) for group in answer["groups"]]
        return answer if sizes == [3, 1] else None

    return wait_for(settled, 120, "rank 1 alone, the three others in one stack")


def test_stacks_of_a_hung_job_single_out_the_hung_rank(launcher, tmp_path):
    job_id = "hung-stacks"
    started = launcher.run(job_id, command=HUNG_JOB)
    assert started.returncode == 0, started.stderr + started.stdout
    assert "warning" not in started.stdout  # preflight: py-spy can attach on both nodes
    try:
        log = node_workdir(launcher) / "jobs" / job_id / "node-a" / "output.log"
        wait_for(lambda: f"rank {HUNG_RANK}: injected hang" in log.read_text(), 180, "the hang")
        answer = _groups_when_settled(launcher, job_id)

        # --json: every rank of both nodes, each with its threads, and the groups.
        assert answer["complete"] is True
        assert sorted((r["node"], r["rank"], r["local_rank"]) for r in answer["ranks"]) == [
            ("node-a", 0, 0), ("node-a", 1, 1), ("node-b", 2, 0), ("node-b", 3, 1),
        ]  # fmt: skip
        assert all(rank["threads"] and "error" not in rank for rank in answer["ranks"])
        assert set(answer["nodes"]) == {"node-a", "node-b"}
        crowd, odd = answer["groups"]
        assert (crowd["ranks"], crowd["nodes"], crowd["odd_one_out"]) == (
            [0, 2, 3], ["node-a", "node-b"], False
        )  # fmt: skip
        assert (odd["ranks"], odd["nodes"], odd["odd_one_out"]) == ([HUNG_RANK], ["node-a"], True)
        # The hung rank's innermost frame is the trainer's hang, in faults.py.
        hang = odd["frames"][-1]
        assert hang["file"].endswith("trainer/faults.py"), odd["frames"]
        assert any(frame["file"].endswith("trainer/train.py") for frame in odd["frames"])
        assert not any(f["file"].endswith("faults.py") for f in crowd["frames"])
        hung_pid = next(r["pid"] for r in answer["ranks"] if r["rank"] == HUNG_RANK)

        # The human form: groups, largest first, the hung rank marked.
        shown = launcher("stacks", job_id)
        assert shown.returncode == 0, shown.stderr + shown.stdout
        print(shown.stdout)  # kept in the test report (-rP) as an example
        text = shown.stdout
        assert text.startswith(f"job {job_id}: 4 rank(s) dumped on node-a, node-b in 2 group(s)")
        assert "\nranks 0,2-3 on node-a, node-b (3 of 4)\n" in text
        odd_header = f"\nrank 1 on node-a (1 of 4, pid {hung_pid})   <-- the odd one out\n"
        assert odd_header in text
        odd_block = text.split(odd_header, 1)[1].split("\n\n", 1)[0].splitlines()
        assert odd_block[-1] == (f"    {hang['function']} ({hang['file']}:{hang['line']})"), text
        assert "not dumped" not in text

        # --nodes: only node-b's ranks, which all wait alike.
        only_b = launcher("stacks", job_id, "--nodes=node-b", "--json")
        assert only_b.returncode == 0, only_b.stderr
        groups = json.loads(only_b.stdout)["groups"]
        assert [(g["ranks"], g["odd_one_out"]) for g in groups] == [([2, 3], False)]

        # A node whose agent finds no py-spy: each of its ranks says so, exit code 1.
        inventory = yaml.safe_load(launcher.inventory.read_text())
        inventory["defaults"]["python"] = str(python_without_py_spy(tmp_path))
        without = tmp_path / "without-py-spy.yml"
        without.write_text(yaml.safe_dump(inventory))
        missing = launcher("stacks", job_id, f"-i={without}")
        assert missing.returncode == 1, missing.stderr + missing.stdout
        python = inventory["defaults"]["python"]
        message = f"py-spy is not installed beside {python} nor on PATH"
        assert missing.stdout.count(message) == 4, missing.stdout
        assert f"rank 1 on node-a (pid {hung_pid}): {message}" in missing.stdout
        assert missing.stdout.startswith(f"job {job_id}: no rank dumped\n")

        # A node that cannot be reached: the other node's ranks are shown, the node's error too.
        launcher.cluster["node-b"].stop_sshd()
        try:
            half = launcher("stacks", job_id)
        finally:
            launcher.cluster["node-b"].start_sshd()
        assert half.returncode == 1, half.stderr + half.stdout
        assert half.stdout.startswith(f"job {job_id}: 2 rank(s) dumped on node-a in 2 group(s)")
        assert "\nnot dumped:\n  node-b: cannot connect: " in half.stdout, half.stdout
    finally:
        stopped = launcher("stop", job_id)
        assert stopped.returncode == 0, stopped.stderr + stopped.stdout


def test_stacks_of_an_unknown_job_say_where_they_looked(launcher):
    unknown = launcher("stacks", "no-such-job")
    assert unknown.returncode == 2
    assert unknown.stdout == ""
    assert unknown.stderr == (
        f"ugro-launch: no job 'no-such-job' in {launcher.state_dir} (`ugro-launch list` shows "
        "the known jobs); for a job launched from another machine give its inventory: "
        "ugro-launch stacks no-such-job -i INVENTORY\n"
    )
    # With an inventory: asked on every node, found on none.
    on_nodes = launcher("stacks", "no-such-job", f"-i={launcher.inventory}")
    assert on_nodes.returncode == 1
    workdir = node_workdir(launcher)
    assert on_nodes.stderr == (
        f"ugro-launch: no job 'no-such-job' on node-a, node-b: looked in "
        f"{workdir}/jobs/no-such-job/<node> on each\n"
    )
    # Bad input is refused before any node is asked.
    for args, expected in [
        (("bad/id",), "job id 'bad/id': expected"),
        (("some-job", "--timeout=0"), "--timeout 0: expected 1 to 300 seconds per rank"),
        (("some-job", f"-i={launcher.inventory}", "--nodes=node-a,,"), "--nodes 'node-a,,'"),
        (("some-job", f"-i={launcher.inventory}", "--nodes=node-z"), "node-z"),
    ]:
        refused = launcher("stacks", *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert expected in refused.stderr, (args, refused.stderr)


# -- the watcher's dump on a stall ------------------------------------------------------------


class ScriptedPrometheus:
    """Answers the stall query from a list: True (stalled), False, or None (unreachable)."""

    def __init__(self, answers: list[bool | None]) -> None:
        self.answers = answers
        self.queries: list[str] = []

    def query(self, expr: str) -> list[dict]:
        self.queries.append(expr)
        answer = self.answers.pop(0)
        if answer is None:
            raise Unreachable("Prometheus at http://127.0.0.1:1 does not answer")
        return [{"metric": {}, "value": [0, "7"]}] if answer else []


def test_the_watcher_dumps_once_per_stall_and_not_between_checks(monkeypatch):
    plan = SimpleNamespace(job_id="j", nodes=(), nproc_per_node=1)
    prometheus = ScriptedPrometheus([None, True, True, False, True])
    now = [0.0]
    dumper = StallDumper(plan, prometheus, check_seconds=10, clock=lambda: now[0])
    dumps: list[float] = []
    monkeypatch.setattr(dumper, "dump", lambda nodes: dumps.append(now[0]) or now[0])
    for second in range(0, 50, 2):
        now[0] = float(second)
        dumper.check(nodes=None)
    # Asked at 0 (unreachable), 10 (stalled: dump), 20 (still: none), 30 (stepping), 40 (dump).
    assert len(prometheus.queries) == 5
    assert prometheus.queries[0] == 'job_rank:ugro_train_stalled:condition{job_id="j"}'
    assert dumps == [10.0, 40.0]


def test_the_watcher_keeps_one_dump_when_the_job_stalls(tmp_path, namespace_cluster, monkeypatch):
    cluster = namespace_cluster(2)
    stack = AlertStack(tmp_path / "stack", {**TEST_THRESHOLDS, "training.stall_min_seconds": 5})
    monkeypatch.setenv("UGRO_PROMETHEUS_URL", stack.prometheus_url)  # the watcher inherits it
    launcher = Launcher(tmp_path, cluster, stack.workdir / "targets")
    job_id = "stall-dump"
    try:
        started = launcher.run(job_id, command=HUNG_JOB)
        assert started.returncode == 0, started.stderr + started.stdout
        (text,) = wait_for(
            lambda: list(launcher.state_dir.glob(f"{job_id}.stacks-*.txt")),
            240,
            "the watcher's dump of the stalled job",
        )
        shown = text.read_text()
        assert shown.startswith(f"job {job_id}: 4 rank(s) dumped on node-a, node-b"), shown
        assert "\nranks 0,2-3 on node-a, node-b (3 of 4)\n" in shown
        assert "\nrank 1 on node-a (1 of 4, pid " in shown
        answer = json.loads(text.with_suffix(".json").read_text())
        assert answer["complete"] is True
        odd = answer["groups"][1]
        assert (odd["ranks"], odd["odd_one_out"]) == ([HUNG_RANK], True)
        assert odd["frames"][-1]["file"].endswith("trainer/faults.py")
        watch_log = (launcher.state_dir / f"{job_id}.watch.log").read_text()
        assert f"job {job_id} stalled: the stacks of its ranks are in {text}" in watch_log
    finally:
        stopped = launcher("stop", job_id)
        launcher.kill_watchers()
        stack.close()
        assert stopped.returncode == 0, stopped.stderr + stopped.stdout
