"""How the tests start Prometheus and Alertmanager: the binaries on PATH, else the images
docker-compose.yml pins, else a skip.

These machines have the Debian packages (``make setup``). A developer's laptop may have
neither binary but a Docker engine: there the same flags go to the compose file's images,
started with testcontainers on the host's network (the tests talk to 127.0.0.1 ports and
serve loopback webhooks) as the current user, with each path the configs name mounted at the
same path inside. That needs a Linux engine, or Docker Desktop with host networking on.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pytest
import yaml

from ugro.common.processes import stop_process_group

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# The compose service of each server, and its binary's names on PATH, preferred first:
# Debian names Alertmanager's binary prometheus-alertmanager, upstream alertmanager.
BINARIES = {
    "prometheus": ("prometheus",),
    "alertmanager": ("prometheus-alertmanager", "alertmanager"),
}


def compose_image(service: str) -> str:
    """The image docker-compose.yml pins for ``service``: one place for the versions."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    if service not in services or "image" not in services[service]:
        raise LookupError(f"{COMPOSE_FILE}: services.{service}.image: missing")
    return services[service]["image"]


def docker_engine_problem() -> str | None:
    """Why no Docker engine can start containers here, or None when one answers."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError as error:
        return f"the docker package is missing ({error}): pip install -e '.[test]'"
    try:
        client = docker.from_env()
        try:
            client.ping()
        finally:
            client.close()
    except (DockerException, OSError) as error:  # requests' errors are OSErrors
        return f"no engine answers ({error})"
    return None


class ServerProcess(Protocol):
    """A started server, subprocess or container alike."""

    returncode: int | None

    def poll(self) -> int | None: ...

    def stop(self, grace: float = 10.0) -> None: ...


class LocalProcess(subprocess.Popen):
    """A server binary in its own process group, so stopping it stops all it started."""

    def stop(self, grace: float = 10.0) -> None:
        stop_process_group(self, grace)


@dataclass(frozen=True)
class LocalBinary:
    path: str

    def start(
        self,
        flags: Sequence[str],
        log: pathlib.Path,
        *,
        writable: Sequence[pathlib.Path] = (),
        readonly: Sequence[pathlib.Path] = (),
    ) -> LocalProcess:
        """Runs the binary with ``flags``, its output into ``log``. The paths are only for a
        container, which would not see them otherwise."""
        with open(log, "wb") as out:
            return LocalProcess(
                [self.path, *flags], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )


class ContainerProcess:
    """A started container, with the subprocess's poll/returncode, its output in ``log``."""

    def __init__(self, container, log: pathlib.Path) -> None:  # a started DockerContainer
        self.container = container
        self.returncode: int | None = None
        self._wrapped = container.get_wrapped_container()
        self._log = log
        self._copier = threading.Thread(target=self._copy_logs, daemon=True)
        self._copier.start()

    def _copy_logs(self) -> None:
        # The stream ends when the container stops.
        with open(self._log, "wb") as out:
            for chunk in self._wrapped.logs(stream=True, follow=True):
                out.write(chunk)
                out.flush()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._wrapped.reload()
            if self._wrapped.status in ("exited", "dead"):
                self._copier.join(5)  # the whole log, for the caller's error message
                self.returncode = self._wrapped.attrs["State"]["ExitCode"]
        return self.returncode

    def stop(self, grace: float = 10.0) -> None:
        from docker.errors import NotFound

        with contextlib.suppress(NotFound):
            self._wrapped.stop(timeout=max(1, round(grace)))  # SIGTERM, SIGKILL after grace
            self.poll()
        self._copier.join(5)
        with contextlib.suppress(NotFound):
            self.container.stop()  # removes the container


@dataclass(frozen=True)
class ComposeImage:
    image: str

    def container_settings(
        self,
        flags: Sequence[str],
        writable: Sequence[pathlib.Path],
        readonly: Sequence[pathlib.Path],
    ) -> tuple[list[str], list[tuple[str, str, str]], dict[str, str]]:
        """The container's command, volumes and docker create arguments.

        The prom/* images' entrypoint is the server, so the command is just the flags. Every
        path is mounted at itself, so the absolute paths in generated configs hold inside.
        ``network`` rather than ``network_mode``: testcontainers adds a ``network`` of its
        own when it runs inside a container, and Docker refuses both at once.
        """
        volumes = [(str(p), str(p), "rw") for p in writable]
        volumes += [(str(p), str(p), "ro") for p in readonly]
        # As the current user, so what the server writes under the test's folder is removable.
        arguments = {"network": "host", "user": f"{os.getuid()}:{os.getgid()}"}
        return list(flags), volumes, arguments

    def start(
        self,
        flags: Sequence[str],
        log: pathlib.Path,
        *,
        writable: Sequence[pathlib.Path] = (),
        readonly: Sequence[pathlib.Path] = (),
    ) -> ContainerProcess:
        from testcontainers.core.container import DockerContainer

        command, volumes, arguments = self.container_settings(flags, writable, readonly)
        container = DockerContainer(self.image, volumes=volumes).with_command(command)
        container.with_kwargs(**arguments).start()
        return ContainerProcess(container, log)


def server(name: str) -> LocalBinary | ComposeImage:
    """How to run ``name`` ("prometheus" or "alertmanager") here; skips the test when the
    machine has neither its binary nor a Docker engine."""
    for binary in BINARIES[name]:
        if path := shutil.which(binary):
            return LocalBinary(path)
    problem = docker_engine_problem()
    if problem is None:
        return ComposeImage(compose_image(name))
    pytest.skip(
        f"neither {' nor '.join(BINARIES[name])} on PATH nor a Docker engine (docker: "
        f"{problem}); install the Debian packages with `make setup`"
    )
