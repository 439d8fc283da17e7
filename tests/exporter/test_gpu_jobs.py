"""GPU ↔ scheduler-job attribution: the Slurm prolog/epilog pair and ``--gpu-jobs-dir``.

The scripts run for real: with the small environment slurmd gives them, and at the end under a
real one-node Slurm (Debian's slurm-wlm) as its Prolog and Epilog. The exporter is the real
process, scraped over HTTP, and a real Prometheus runs the documented join. The doubles are
those for the GPU, as none is here: NVML (tests/exporter/fake_nvml.py) and an ``nvidia-smi``
script printing what the real one prints for ``--query-gpu=index,uuid --format=csv,noheader``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator

import pytest
import yaml

from tests.support.fake_gpu import FAKE_GPU_UUIDS
from tests.support.net import http_json
from tests.support.servers import server
from ugro.common.ports import free_ports
from ugro.common.processes import stop_process_group, wait_until_ready
from ugro.exporter.scheduler_jobs import GpuJobCollector, MalformedGpuJobFile, parse_gpu_job_file

from ..support import sample, sample_values, scrape, wait_for
from .test_cli import FAKE, exporter_env

SLURM = pathlib.Path(__file__).resolve().parents[2] / "exporter" / "slurm"
PROLOG = SLURM / "prolog.sh"
EPILOG = SLURM / "epilog.sh"
INFO = "ugro_gpu_scheduler_job_info"


def fake_nvidia_smi(bin_dir: pathlib.Path, uuids: list[str]) -> pathlib.Path:
    """An ``nvidia-smi`` that answers the prolog's one query as the real one does."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{index}, {uuid}\\n" for index, uuid in enumerate(uuids))
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$*" != "--query-gpu=index,uuid --format=csv,noheader" ]; then\n'
        '  echo "unexpected arguments: $*" >&2; exit 2\n'
        "fi\n"
        f"printf '{rows}'\n"
    )
    script.chmod(0o755)
    return script


def run_script(
    script: pathlib.Path, jobs_dir: pathlib.Path, path: str = "/usr/bin:/bin", **slurm: str
) -> subprocess.CompletedProcess[str]:
    # Slurm's own environment for prologs is this small: no inherited variables.
    env = {"PATH": path, "UGRO_GPU_JOBS_DIR": str(jobs_dir), **slurm}
    return subprocess.run(
        [str(script)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def job_files(jobs_dir: pathlib.Path) -> dict[str, str]:
    """The mapping files (not the prolog's lock), by name."""
    if not jobs_dir.is_dir():
        return {}
    return {p.name: p.read_text() for p in jobs_dir.iterdir() if not p.name.startswith(".")}


@pytest.fixture
def node(tmp_path):
    """A node with 4 GPUs: its nvidia-smi on PATH and the prolog's directory (not yet made)."""
    uuids = FAKE_GPU_UUIDS[:4]
    fake_nvidia_smi(tmp_path / "bin", uuids)
    return {
        "path": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "dir": tmp_path / "gpu-jobs",
        "uuids": uuids,
    }


def prolog(node, job: str, user: str, gpus: str) -> subprocess.CompletedProcess[str]:
    return run_script(
        PROLOG, node["dir"], node["path"],
        SLURM_JOB_ID=job, SLURM_JOB_USER=user, SLURM_JOB_UID="1000", SLURM_JOB_GPUS=gpus,
    )  # fmt: skip


def epilog(node, job: str) -> subprocess.CompletedProcess[str]:
    return run_script(EPILOG, node["dir"], node["path"], SLURM_JOB_ID=job, SLURM_JOB_USER="x")


def test_the_prolog_writes_one_file_per_allocated_gpu_named_by_its_uuid(node):
    result = prolog(node, "4242", "alice", "1,3")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    uuids = node["uuids"]
    assert job_files(node["dir"]) == {
        uuids[1]: "job_id=4242\nuser=alice\n",
        uuids[3]: "job_id=4242\nuser=alice\n",
    }
    # Readable by an exporter that does not run as root; no temporary file left behind.
    assert (node["dir"] / uuids[1]).stat().st_mode & 0o777 == 0o644
    assert node["dir"].stat().st_mode & 0o777 == 0o755
    assert [p.name for p in node["dir"].iterdir() if p.name.startswith(".")] == [".lock"]


def test_without_a_user_name_the_prolog_records_the_uid(node):
    result = run_script(
        PROLOG,
        node["dir"],
        node["path"],
        SLURM_JOB_ID="7",
        SLURM_JOB_UID="1234",
        SLURM_JOB_GPUS="0",
    )
    assert result.returncode == 0, result.stderr
    assert job_files(node["dir"]) == {node["uuids"][0]: "job_id=7\nuser=1234\n"}


def test_the_epilog_removes_only_the_files_that_name_its_job(node):
    uuids = node["uuids"]
    assert prolog(node, "100", "alice", "0,1").returncode == 0
    assert prolog(node, "200", "bob", "2").returncode == 0
    # A job sharing GPU 1 takes its file over (the newest job is the one shown).
    assert prolog(node, "300", "carol", "1").returncode == 0
    (node["dir"] / "GPU-ffffffff-0000-0000-0000-000000000000").write_text("job_id=1000\nuser=d\n")

    result = epilog(node, "100")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert job_files(node["dir"]) == {
        uuids[1]: "job_id=300\nuser=carol\n",
        uuids[2]: "job_id=200\nuser=bob\n",
        # job_id=1000 starts with "100" but is another job
        "GPU-ffffffff-0000-0000-0000-000000000000": "job_id=1000\nuser=d\n",
    }
    assert epilog(node, "300").returncode == 0
    assert epilog(node, "200").returncode == 0
    assert set(job_files(node["dir"])) == {"GPU-ffffffff-0000-0000-0000-000000000000"}


def test_the_epilog_of_a_node_that_never_ran_a_gpu_job_does_nothing(node):
    result = epilog(node, "5")
    assert (result.returncode, result.stderr) == (0, "")
    assert not node["dir"].exists()


@pytest.mark.parametrize(
    ("case", "complaint"),
    [
        ("no GPUs in the job", None),
        ("SLURM_JOB_GPUS unset", None),
        ("no nvidia-smi", "not found; nothing recorded"),
        ("nvidia-smi fails", "failed; nothing recorded"),
        ("GPU index nvidia-smi does not list", "nvidia-smi lists no GPU 9; skipped"),
        ("Slurm's NoDevFiles", "'NoDevFiles' is not a GPU number; skipped"),
        ("directory cannot be made", "stopped (status 1); its GPUs stay unattributed"),
        ("no job id", "SLURM_JOB_ID '' is not a job number"),
        ("user name with a newline", "is empty or has blanks"),
    ],
)
def test_the_prolog_never_fails_the_job(node, tmp_path, case, complaint):
    slurm = {"SLURM_JOB_ID": "11", "SLURM_JOB_USER": "alice", "SLURM_JOB_GPUS": "0"}
    path, jobs_dir = node["path"], node["dir"]
    if case == "no GPUs in the job":
        slurm["SLURM_JOB_GPUS"] = ""
    elif case == "SLURM_JOB_GPUS unset":
        del slurm["SLURM_JOB_GPUS"]
    elif case == "no nvidia-smi":
        # A path, so that a real nvidia-smi on a GPU machine running these tests is not found.
        path, slurm["UGRO_NVIDIA_SMI"] = "/usr/bin:/bin", str(tmp_path / "none" / "nvidia-smi")
    elif case == "nvidia-smi fails":
        failing = tmp_path / "failing" / "nvidia-smi"
        failing.parent.mkdir()
        failing.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
        failing.chmod(0o755)
        slurm["UGRO_NVIDIA_SMI"] = str(failing)
    elif case == "GPU index nvidia-smi does not list":
        slurm["SLURM_JOB_GPUS"] = "9"
    elif case == "Slurm's NoDevFiles":
        slurm["SLURM_JOB_GPUS"] = "NoDevFiles"
    elif case == "directory cannot be made":
        (tmp_path / "a-file").write_text("")
        jobs_dir = tmp_path / "a-file" / "gpu-jobs"
    elif case == "no job id":
        del slurm["SLURM_JOB_ID"]
    elif case == "user name with a newline":
        slurm["SLURM_JOB_USER"] = "alice\njob_id=1"
    result = run_script(PROLOG, jobs_dir, path, **slurm)
    assert result.returncode == 0
    assert job_files(jobs_dir) == {}
    if complaint is None:
        assert result.stderr == ""
    else:
        assert "ugro-gpu-jobs prolog: " in result.stderr and complaint in result.stderr


def test_the_file_format_is_parsed_strictly_and_other_keys_are_ignored():
    job = parse_gpu_job_file("GPU-1", "job_id=12\nuser=alice\nuid=1000\n")
    assert (job.gpu_uuid, job.scheduler_job_id, job.user) == ("GPU-1", "12", "alice")
    for text, problem in [
        ("job_id=12\n", "no user= line"),
        ("job_id=12\nuser=\n", "user='': expected 1 to 128 characters"),
        ("job_id=1 2\nuser=a\n", "job_id='1 2'"),
        ("job_id=12\njob_id=13\nuser=a\n", "'job_id' given twice"),
        ("hello\n", "line 1: expected KEY=VALUE"),
    ]:
        with pytest.raises(MalformedGpuJobFile, match=problem):
            parse_gpu_job_file("GPU-1", text)


def test_a_bad_file_is_counted_once_and_the_good_ones_still_served(tmp_path):
    collector = GpuJobCollector(tmp_path)
    (tmp_path / FAKE_GPU_UUIDS[0]).write_text("job_id=1\nuser=a\n")
    (tmp_path / FAKE_GPU_UUIDS[1]).write_bytes(b"\xff\xfe")
    (tmp_path / "notes.txt").write_text("job_id=2\nuser=b\n")
    (tmp_path / FAKE_GPU_UUIDS[2]).symlink_to(tmp_path / FAKE_GPU_UUIDS[0])
    (tmp_path / ".GPU-tmp.123").write_text("half-writ")  # the prolog's temporary file
    for _ in range(3):
        assert [job.gpu_uuid for job in collector.read()] == [FAKE_GPU_UUIDS[0]]
    assert collector.health.errors == 3 and collector.health.up
    (tmp_path / FAKE_GPU_UUIDS[1]).write_text("job_id=3\nuser=c\nextra\n")  # changed: counts
    collector.read()
    assert collector.health.errors == 4


def test_a_missing_directory_serves_nothing_and_an_unreadable_one_is_a_down_collector(tmp_path):
    collector = GpuJobCollector(tmp_path / "not-yet")
    assert collector.read() == [] and collector.health.up
    (tmp_path / "not-a-dir").write_text("")
    broken = GpuJobCollector(tmp_path / "not-a-dir")
    assert broken.read() == []
    assert broken.health.down_reason == "directory_unreadable"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("{file}", "--gpu-jobs-dir '{file}': {file} is not a directory"),
        ("{file}/x", "--gpu-jobs-dir '{file}/x': {file} is not a directory"),
        ("", "--gpu-jobs-dir '': expected the directory the Slurm prolog writes"),
    ],
)
def test_a_bad_gpu_jobs_dir_is_one_line_and_exit_code_2(tmp_path, value, expected):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "ugro.exporter", "--once", "--gpu-jobs-dir",
         value.format(file=a_file)],
        env=exporter_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected.format(file=a_file) in lines[0], result.stderr
    assert result.stdout == ""


def test_the_running_exporter_serves_the_job_while_the_prolog_file_exists(
    node, tmp_path, start_process, free_port_block, promtool
):
    port = free_port_block(1)
    start_process(
        [
            sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}",
            "--node", "gpu-node-1", "--poll-interval", "0.5", "--nvml-module", FAKE,
            "--gpu-jobs-dir", str(node["dir"]),
        ],
        exporter_env(UGRO_FAKE_NVML_GPUS="4"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    gpu_jobs_up = {"collector": "gpu_jobs"}
    before = wait_for(lambda: sample_values(scrape(url)), 30, "the first scrape")
    assert sample(before, "ugro_exporter_collector_up", **gpu_jobs_up) == 1
    assert not [name for name, _ in before if name == INFO]  # no job yet, no directory yet

    assert prolog(node, "4242", "alice", "1,3").returncode == 0
    uuid = node["uuids"][1]
    job = {"gpu_uuid": uuid, "scheduler_job_id": "4242", "user": "alice"}
    during = wait_for(
        lambda: (s := sample_values(scrape(url))) and sample(s, INFO, **job) == 1 and s,
        30,
        "the job's info series",
    )
    assert sorted(labels for name, labels in during if name == INFO) == sorted(
        tuple(sorted({**job, "gpu_uuid": u}.items())) for u in node["uuids"][1::2]
    )
    # The GPU's own series carry the same gpu_uuid: what the PromQL join matches on.
    assert sample(during, "ugro_gpu_utilization_ratio", gpu="1", gpu_uuid=uuid) is not None

    # A file that is not what the prolog writes breaks neither the scrape nor the other series.
    (node["dir"] / node["uuids"][0]).write_text("this is not a mapping\n")
    text = scrape(url)
    check = promtool(text)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout
    broken = sample_values(text)
    assert sample(broken, INFO, **job) == 1
    assert sample(broken, "ugro_exporter_collector_errors_total", **gpu_jobs_up) == 1
    assert sample(broken, "ugro_node_memory_total_bytes") > 0

    assert epilog(node, "4242").returncode == 0
    wait_for(
        lambda: not [name for name, _ in sample_values(scrape(url)) if name == INFO],
        30,
        "the info series gone after the epilog",
    )
    after = sample_values(scrape(url))
    assert sample(after, "ugro_exporter_collector_errors_total", **gpu_jobs_up) == 1  # once


def test_prometheus_joins_gpu_readings_to_the_slurm_job(
    node, tmp_path, start_process, free_port_block
):
    port = free_port_block(2)
    prom_port = port + 1
    start_process(
        [
            sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}",
            "--nvml-module", FAKE, "--gpu-jobs-dir", str(node["dir"]),
        ],
        exporter_env(UGRO_FAKE_NVML_GPUS="4"),
    )  # fmt: skip
    assert prolog(node, "4242", "alice", "2").returncode == 0

    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "node", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                ],
            }
        )
    )
    prometheus = server("prometheus").start(
        [
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        tmp_path / "prometheus.log",
        writable=[tmp_path],
    )
    try:
        base = f"http://127.0.0.1:{prom_port}"
        wait_until_ready(f"{base}/-/ready", 30, process=prometheus, what="Prometheus")
        query = (
            "ugro_gpu_utilization_ratio * on(gpu_uuid) group_left(scheduler_job_id, user) "
            "ugro_gpu_scheduler_job_info"
        )
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        result = wait_for(lambda: http_json(url)["data"]["result"], 30, "the joined series")
    finally:
        prometheus.stop()
    [series] = result
    labels = series["metric"]
    assert (labels["gpu"], labels["gpu_uuid"]) == ("2", node["uuids"][2])
    assert (labels["scheduler_job_id"], labels["user"]) == ("4242", "alice")


def test_the_scripts_are_posix_sh():
    for script in (PROLOG, EPILOG):
        assert script.read_text().startswith("#!/bin/sh\n")
        assert os.access(script, os.X_OK)
        # dash is Debian's /bin/sh and refuses bash-only syntax that bash would accept.
        if dash := next((p for p in ("/bin/dash", "/usr/bin/dash") if os.path.exists(p)), None):
            check = subprocess.run([dash, "-n", str(script)], capture_output=True, text=True)
            assert check.returncode == 0, check.stderr


# --- under a real Slurm --------------------------------------------------------------------


def slurm_problem() -> str | None:
    """Why a one-node Slurm cannot run here, or None."""
    if os.geteuid() != 0:
        return "slurmd runs prologs as root, and munged as the munge user: needs root"
    for binary in ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "sinfo", "runuser"):
        if shutil.which(binary) is None and not os.path.exists(f"/usr/sbin/{binary}"):
            return f"{binary} is not installed (Debian packages slurm-wlm and munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no user 'munge' (Debian package munge creates it)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@contextlib.contextmanager
def one_node_slurm(
    log_dir: pathlib.Path, jobs_dir: pathlib.Path, nvidia_smi: pathlib.Path
) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """munged, slurmctld and slurmd on this host: one node with 2 GPUs, the ugro pair as its
    Prolog/Epilog. Yields a runner of Slurm client commands (sbatch, scancel, …) for it."""
    # munged refuses a key or socket below a directory others may write (/tmp): one under /run.
    work = pathlib.Path("/run") / f"ugro-gpu-jobs-test-{secrets.token_hex(4)}"
    processes: list[subprocess.Popen] = []
    try:
        munge_dir = work / "munge"
        munge_dir.mkdir(parents=True)
        work.chmod(0o755)
        key = munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o400)
        munge = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        socket_path = munge_dir / "munge.socket"

        def spawn(argv: list[str], log: str) -> subprocess.Popen:
            with open(log_dir / log, "ab") as out:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
                )
            processes.append(process)
            return process

        spawn(
            [
                "runuser", "-u", "munge", "--", _binary("munged"), "--foreground",
                f"--key-file={key}", f"--socket={socket_path}",
                f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'seed'}",
                f"--log-file={munge_dir / 'munged.log'}",
            ],
            "munged.log",
        )  # fmt: skip
        wait_for(socket_path.exists, 20, "munged's socket")

        # Slurm sets SLURM_JOB_GPUS only for GPUs whose gres.conf File= is a device node.
        devices = work / "dev"
        devices.mkdir()
        for minor in (0, 1):
            os.mknod(devices / f"nvidia{minor}", 0o600 | stat.S_IFCHR, os.makedev(195, minor))
        # slurm.conf cannot set a prolog's environment: a wrapper points the pair at the test's
        # directory and nvidia-smi double.
        settings = f"UGRO_GPU_JOBS_DIR={jobs_dir} UGRO_NVIDIA_SMI={nvidia_smi}"
        for name, script in (("prolog", PROLOG), ("epilog", EPILOG)):
            wrapper = work / f"{name}.sh"
            wrapper.write_text(
                f"#!/bin/sh\nexec env {settings} {script} 2>>{log_dir / (name + '.log')}\n"
            )
            wrapper.chmod(0o755)
        host = socket.gethostname().split(".")[0]
        controller_port, slurmd_port = free_ports(2)
        (work / "gres.conf").write_text(f"NodeName=gpunode Name=gpu File={devices}/nvidia[0-1]\n")
        conf = work / "slurm.conf"
        conf.write_text(
            f"""\
ClusterName=ugrogpujobs
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={work / "state"}
SlurmdSpoolDir={work / "spool"}
SlurmctldPidFile={work / "slurmctld.pid"}
SlurmdPidFile={work / "slurmd.pid"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
KillWait=5
GresTypes=gpu
Prolog={work / "prolog.sh"}
Epilog={work / "epilog.sh"}
PrologFlags=Alloc
NodeName=gpunode NodeHostname={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} Gres=gpu:2
PartitionName=gpu Nodes=gpunode Default=YES MaxTime=INFINITE State=UP
"""
        )
        environment = {**os.environ, "SLURM_CONF": str(conf)}

        def client(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [_binary(argv[0]), *argv[1:]],
                env=environment,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )

        spawn([_binary("slurmctld"), "-D", "-i", "-f", str(conf)], "slurmctld.log")
        wait_for(lambda: client("sinfo", "-h").returncode == 0, 30, "slurmctld")
        spawn([_binary("slurmd"), "-D", "-N", "gpunode", "-f", str(conf)], "slurmd.log")
        wait_for(
            lambda: client("sinfo", "-h", "-N", "-o", "%t").stdout.strip() == "idle",
            60,
            "the node idle",
        )
        yield client
    finally:
        for process in reversed(processes):
            stop_process_group(process, 10)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.skipif(slurm_problem() is not None, reason=str(slurm_problem()))
def test_under_slurm_a_batch_job_s_gpus_are_attributed_until_it_ends(
    tmp_path, start_process, free_port_block
):
    uuids = FAKE_GPU_UUIDS[:2]
    nvidia_smi = fake_nvidia_smi(tmp_path / "bin", uuids)
    jobs_dir = tmp_path / "gpu-jobs"
    port = free_port_block(1)
    start_process(
        [
            sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}",
            "--nvml-module", FAKE, "--gpu-jobs-dir", str(jobs_dir),
        ],
        exporter_env(UGRO_FAKE_NVML_GPUS="2"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"

    def jobs() -> dict[str, tuple[str, str]]:
        samples = sample_values(scrape(url))
        return {
            labels["gpu_uuid"]: (labels["scheduler_job_id"], labels["user"])
            for labels in (dict(key) for name, key in samples if name == INFO)
        }

    with one_node_slurm(tmp_path, jobs_dir, nvidia_smi) as client:
        submitted = client(
            "sbatch", "--parsable", "--gres=gpu:2", f"--output={tmp_path / 'job.out'}",
            "--wrap", "sleep 300",
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().split(";")[0]
        wait_for(lambda: jobs() == {u: (job, "root") for u in uuids}, 60, "the job's GPUs")

        assert client("scancel", job).returncode == 0
        wait_for(lambda: jobs() == {}, 60, "the job's GPUs released by the epilog")
    for name in ("prolog", "epilog"):
        log = tmp_path / f"{name}.log"
        assert not log.exists() or log.read_text() == "", log.read_text()
