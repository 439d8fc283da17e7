"""``ugro demo`` (``make demo``): the whole of ugro on this machine, without Docker.

1. starts Prometheus and Alertmanager with the repository's configuration (console/localstack.py:
   data under the state directory, 2 s intervals), ugro-exporter, and a Slack-compatible
   webhook on loopback that prints each notification here;
2. launches the reference trainer on 2 ranks through ``ugro-launch`` (a local node), with rank 1's
   loss poisoned for a few steps late in the run, so an alert fires and then resolves;
3. shows ``ugro watch`` while the job runs and prints ``ugro report`` when it ends;
4. stops everything it started (``--keep`` leaves Prometheus and Alertmanager running after a
   demo that completed, for PromQL exploration).

Ctrl-C, SIGTERM or a closed terminal (SIGHUP) at any moment stops the job and everything else,
``--keep`` or not. If the demo itself is killed (SIGKILL), its guard process stops them
(console/guard.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import yaml
from rich.console import Console

from ugro.common.ports import (
    DEFAULT_EXPORTER_PORT,
    NoFreePorts,
    free_port,
    free_port_block,
)
from ugro.common.processes import NotReady, ProcessExited, wait_until_ready

from . import report, watch
from .guard import Ledger, start_guard
from .localstack import LocalStack, NotificationReceiver, StackError
from .servers import Alertmanager, Prometheus

NODE = "local"
RANKS = 2
DEFAULT_STEPS = 600  # about 45 s of training on 2 cores
FAULT_STEPS = 5  # consecutive steps whose loss is NaN on the faulty rank
FAULT_RANK = 1
# After the job ends, how long to wait for the alert's "resolved" notification.
RESOLVE_WAIT_SECONDS = 45
GUARD_EXIT_SECONDS = 10  # with an empty ledger it exits at once
EXPORTER_READY_SECONDS = 20


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a monitored 2-rank training job on this machine, end to end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help="training steps (default %(default)s; the fault comes at 60%% of them)",
    )
    parser.add_argument(
        "--state-dir",
        type=pathlib.Path,
        default=pathlib.Path(".state/demo"),
        help="where Prometheus, Alertmanager and the job keep their files; emptied first "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave Prometheus and Alertmanager running at the end, for PromQL exploration",
    )
    parser.add_argument(
        "--interval", type=float, default=2.0, help="seconds between live-view refreshes"
    )
    parser.set_defaults(run=run)


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.state_dir: pathlib.Path = args.state_dir.resolve()
        self.receiver: NotificationReceiver | None = None
        self.stack: LocalStack | None = None
        self.exporter: subprocess.Popen | None = None
        self.ledger: Ledger | None = None  # what the demo started and must stop
        self.guard: subprocess.Popen | None = None
        self.guard_pipe: int | None = None  # the guard stops the ledger's entries at its EOF
        self.job_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        self.env = {**os.environ, "UGRO_STATE_DIR": str(self.state_dir / "jobs")}
        self.completed = False  # --keep applies only to a demo that ran to its end
        self.notifications: list[str] = []
        self._lock = threading.Lock()

    # -- stages --------------------------------------------------------------------------

    def stage(self, text: str) -> None:
        self.console.print(f"[bold cyan]==>[/] {text}")

    def check_prerequisites(self) -> None:
        self.stage("checking what the demo needs")
        if self.args.steps < 50:
            raise StackError(f"--steps {self.args.steps}: expected at least 50")
        if importlib.util.find_spec("torch") is None:
            raise StackError(
                f"PyTorch is not installed in {sys.executable}: run `make setup` "
                "(it installs ugro with the [train] extra)"
            )
        for name, package in (
            ("prometheus", "prometheus"),
            ("prometheus-alertmanager", "prometheus-alertmanager"),
        ):
            if not shutil.which(name):
                raise StackError(
                    f"{name} is not on PATH: run `make setup`, or `apt-get install {package}`"
                )
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True)

    def start_guard(self) -> None:
        """Before anything else starts: whatever the ledger lists is stopped by the guard
        when this process exits, even by SIGKILL."""
        self.ledger = Ledger(self.state_dir / "started.json")
        self.guard, self.guard_pipe = start_guard(self.ledger, self.state_dir / "guard.log")

    def start_stack(self) -> None:
        self.stage("starting Prometheus, Alertmanager and a local Slack webhook")
        self.receiver = NotificationReceiver(self.notify)
        self.stack = LocalStack(
            self.state_dir, self.receiver.url, on_started=self.ledger.add_process
        )
        self.stack.start()
        self.console.print(
            f"    Prometheus {self.stack.prometheus_url}   "
            f"Alertmanager {self.stack.alertmanager_url}   files in {self.state_dir}"
        )

    def start_exporter(self) -> int:
        self.stage("starting ugro-exporter (no GPU here: host metrics, GPU collector down)")
        port = free_port(DEFAULT_EXPORTER_PORT)
        log = self.state_dir / "exporter.log"
        with open(log, "wb") as output:
            self.exporter = subprocess.Popen(
                [sys.executable, "-m", "ugro.exporter", f"--listen=127.0.0.1:{port}",
                 f"--node={NODE}"],
                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.ledger.add_process("ugro-exporter", self.exporter.pid)
        try:
            wait_until_ready(
                f"http://127.0.0.1:{port}/metrics",
                EXPORTER_READY_SECONDS,
                process=self.exporter,
                what="ugro-exporter",
            )
        except ProcessExited:
            raise StackError(f"ugro-exporter exited at start; see {log}") from None
        except NotReady:
            raise StackError(f"ugro-exporter did not answer on port {port}; see {log}") from None
        return port

    def write_inventory(self, exporter_port: int) -> pathlib.Path:
        try:
            metrics_port = free_port_block(RANKS)
        except NoFreePorts as error:
            raise StackError(str(error)) from None
        inventory = {
            "defaults": {
                "python": sys.executable,
                "workdir": str(self.state_dir / "work"),
                "exporter_port": exporter_port,
                "metrics_base_port": metrics_port,
                "min_free_disk_gb": 0,
                # Two ranks share this machine's cores: one thread each keeps them from
                # fighting over the CPUs.
                "env": {"OMP_NUM_THREADS": "1"},
            },
            "prometheus": {"targets_dir": str(self.stack.targets_dir)},
            "nodes": [{"name": NODE, "host": "localhost"}],
        }
        path = self.state_dir / "inventory.yml"
        path.write_text(yaml.safe_dump(inventory, sort_keys=False))
        return path

    def launch(self, inventory: pathlib.Path) -> None:
        fault_at = int(self.args.steps * 0.6)
        self.stage(
            f"launching job {self.job_id} with ugro-launch: {RANKS} ranks, {self.args.steps} "
            f"steps; rank {FAULT_RANK}'s loss turns NaN for {FAULT_STEPS} steps at step "
            f"{fault_at}"
        )
        command = [
            sys.executable, "-m", "ugro.launcher.cli", "run", f"--inventory={inventory}",
            f"--job-id={self.job_id}", f"--nproc-per-node={RANKS}",
            f"--rdzv-port={free_port()}", "--",
            "-m", "ugro.trainer.train", "--steps", str(self.args.steps),
            "--log-every", "1000000",
            f"--fault-rank={FAULT_RANK}", f"--nonfinite-loss-from={fault_at}",
            f"--nonfinite-loss-steps={FAULT_STEPS}",
        ]  # fmt: skip
        self.ledger.add_job(self.job_id, self.state_dir / "jobs")
        # Output to files, not pipes: a launcher rolling back after Ctrl-C must never block
        # on a pipe that nobody reads any more.
        stdout, stderr = self.state_dir / "launch.out", self.state_dir / "launch.err"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            launcher = subprocess.Popen(
                command, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        self.ledger.add_process("ugro-launch run", launcher.pid, kind="launcher")
        returncode = launcher.wait()
        self.ledger.forget_process("ugro-launch run")
        for line in stdout.read_text(errors="replace").splitlines():
            self.console.print(f"    {line}", markup=False, highlight=False)
        if returncode != 0:
            raise StackError(
                f"ugro-launch failed (exit {returncode}):\n{stderr.read_text(errors='replace')}"
            )

    def follow(self) -> int:
        self.stage(f"ugro watch {self.job_id} (until the job ends; Ctrl-C stops the demo)")
        prometheus = Prometheus(self.stack.prometheus_url, timeout=5)
        alertmanager = Alertmanager(self.stack.alertmanager_url, timeout=5)

        def snapshot() -> watch.JobSnapshot:
            return watch.gather(self.job_id, prometheus, alertmanager)

        if self.console.is_terminal:
            return watch.watch(snapshot, self.console, self.args.interval, until_done=True)
        # Not a terminal (a log, CI): a frame every few seconds instead of a redrawn view.
        last_print = 0.0
        while True:
            frame = snapshot()
            if frame.outcome is not None or time.monotonic() - last_print > 15:
                self.console.print(watch.render(frame))
                last_print = time.monotonic()
            if frame.outcome is not None:
                return frame.outcome
            time.sleep(self.args.interval)

    def wait_for_resolution(self) -> None:
        """The job is over, so its alert resolves (its series stop); show that notification."""
        self.stage("waiting for the alert's resolved notification")
        deadline = time.monotonic() + RESOLVE_WAIT_SECONDS
        while time.monotonic() < deadline:
            with self._lock:
                if any(title.startswith("[RESOLVED") for title in self.notifications):
                    return
            time.sleep(0.5)
        self.console.print(
            f"[yellow]    no resolved notification within {RESOLVE_WAIT_SECONDS} s; "
            f"see {self.state_dir / 'alertmanager' / 'alertmanager.log'}[/]"
        )

    def print_report(self) -> None:
        self.stage(f"ugro report {self.job_id}")
        if not report.print_report(
            self.job_id, Prometheus(self.stack.prometheus_url), self.console
        ):
            raise StackError(f"no report for job {self.job_id}: see the line above")

    # -- notifications and teardown ------------------------------------------------------

    def notify(self, title: str, text: str) -> None:
        with self._lock:
            self.notifications.append(title)
        colour = "green" if title.startswith("[RESOLVED") else "red"
        self.console.print(f"[bold {colour}]Slack ▸ {title}[/]", highlight=False)
        for line in text.splitlines():
            self.console.print(f"  {line}", markup=False, highlight=False)

    def stop_everything(self) -> None:
        if self.stack is not None and self.args.keep and self.completed:
            for name in self.stack.pids():
                self.ledger.forget_process(name)  # handed to the user
            pids = " ".join(str(pid) for pid in self.stack.pids().values())
            self.stage("left running (--keep):")
            self.console.print(
                f"    Prometheus   {self.stack.prometheus_url}  (try: "
                f'job:ugro_train_loss:mean5m{{job_id="{self.job_id}"}})\n'
                f"    Alertmanager {self.stack.alertmanager_url}\n"
                f"    stop them with: kill {pids}",
                highlight=False,
            )
        if self.ledger is not None:
            self.ledger.stop_all(lambda text: self.console.print(f"    {text}", highlight=False))
        if self.receiver is not None:
            self.receiver.close()
        if self.guard is not None:
            os.close(self.guard_pipe)  # the guard finds the ledger empty and exits
            try:
                self.guard.wait(timeout=GUARD_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.console.print(
                    f"[yellow]    the guard did not exit; see {self.state_dir / 'guard.log'}[/]"
                )


def run(args: argparse.Namespace) -> int:
    # Not a terminal (a log, CI): wide enough for the report's tables.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    demo = Demo(args, console)
    started = time.monotonic()
    # Ctrl-C, SIGTERM (a CI runner's timeout, `kill`) and SIGHUP (the terminal closed) all
    # tear down. SIGINT is set here too, explicitly: a demo started with SIGINT ignored (a
    # background job of a non-interactive shell) would otherwise never see Ctrl-C.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        demo.check_prerequisites()
        demo.start_guard()
        demo.start_stack()
        exporter_port = demo.start_exporter()
        demo.launch(demo.write_inventory(exporter_port))
        outcome = demo.follow()
        if outcome != 0:
            raise StackError(
                f"job {demo.job_id} did not finish normally; "
                f"`ugro-launch logs {demo.job_id}` (UGRO_STATE_DIR={demo.state_dir / 'jobs'})"
            )
        demo.wait_for_resolution()
        demo.print_report()
        demo.completed = True
        demo.stage(f"done in {time.monotonic() - started:.0f} s")
        return 0
    except StackError as error:
        console.print(f"[bold red]ugro demo:[/] {error}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("\n[bold]==> interrupted: stopping everything the demo started[/]")
        return 130
    finally:
        # A second Ctrl-C must not cut the teardown short and leave processes behind.
        # (A handler that does nothing, not SIG_IGN: an ignored signal would stay ignored in
        # the processes the teardown starts.)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _ignore)
        demo.stop_everything()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _ignore(signum: int, frame: object) -> None:
    pass
