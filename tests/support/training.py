"""The reference trainer under torchrun on this machine, as a job of an ``AlertStack``."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import threading

from tests.support.stack import AlertStack
from ugro.common.ports import free_port, free_port_block
from ugro.common.processes import stop_process_group
from ugro.launcher.targets import RankEndpoint


def _start(argv: list[str], log: pathlib.Path, env: dict[str, str] | None = None):
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


class TrainingJob:
    """The reference trainer under torchrun on this machine, registered with Prometheus.

    It does what ugro-launch does for a job's targets: registers every rank's endpoint when
    the job starts and, when torchrun exits 0, removes them, so a normal finish leaves
    nothing behind to alert on. A failed job keeps its targets, so its dead ranks alert.
    """

    def __init__(
        self,
        stack: AlertStack,
        job_id: str,
        trainer_args: list[str],
        *,
        processes: int = 2,
        node: str = "node-a",
        deregister: bool = True,
    ) -> None:
        self.stack = stack
        self.deregister = deregister  # False: its targets outlive it, as with a lost watcher
        self.job_id = job_id
        self.node = node
        self.base_port = free_port_block(processes)
        self.log = stack.workdir / f"{job_id}.log"
        env = {
            **os.environ,
            "UGRO_JOB_ID": job_id,
            "UGRO_METRICS_PORT": str(self.base_port),
            "UGRO_METRICS_ADDR": "127.0.0.1",
            "UGRO_NODE": node,
            "UGRO_REGISTERED_TARGET": "1",  # registered below, as ugro-launch does
            "OMP_NUM_THREADS": "1",
        }
        stack.targets.register_job(
            job_id,
            [RankEndpoint("127.0.0.1", self.base_port + r, r, node) for r in range(processes)],
        )
        self.process = _start(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={processes}",
                "--master-port",
                str(free_port()),
                "-m",
                "ugro.trainer.train",
                "--log-every",
                "1000000",
                *trainer_args,
            ],
            self.log,
            env,
        )
        self._exit_code: int | None = None
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        code = self.process.wait()
        if code == 0 and self.deregister:
            self.stack.targets.remove_job(self.job_id)
        self._exit_code = code

    def wait(self, timeout: float) -> int:
        self._watcher.join(timeout)
        if self._watcher.is_alive():
            raise AssertionError(f"job {self.job_id} still running after {timeout}s")
        return self._exit_code

    def rank_pid(self, rank: int) -> int:
        """The process id of a rank, found among torchrun's children by its RANK variable."""
        import psutil

        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.environ().get("RANK") == str(rank) and "ugro.trainer.train" in " ".join(
                    child.cmdline()
                ):
                    return child.pid
        raise LookupError(f"rank {rank} of job {self.job_id} not found")

    def stop(self) -> None:
        stop_process_group(self.process, grace=10.0)
        self._watcher.join(5)
