"""``preflight``: can this node run a job? Facts, and the problems found, as sentences.

``problems`` stop a launch; ``warnings`` do not (a node where py-spy cannot attach still
trains, only ``ugro-launch stacks`` cannot dump its ranks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import socket
import stat
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from ugro.common.web_config import WebConfig, WebConfigError, load_web_config

from .. import jobfiles
from ..jobfiles import UnsafePath
from .base import bind_error
from .stacks import attach_problem


def preflight(
    workdir: str,
    *,
    ports: Sequence[int] = (),
    gpus: int | None = None,
    min_free_bytes: int = 0,
    bind_address: str = "0.0.0.0",
    chdir: str | None = None,
    web_config: str | None = None,
) -> dict[str, Any]:
    """Can this node run a job? Facts, ``problems`` (sentences, empty when all is well) and
    ``warnings`` (sentences about what will not work here, which do not stop a launch)."""
    problems: list[str] = []
    warnings: list[str] = []
    if chdir is not None and not os.path.isdir(os.path.expanduser(chdir)):
        problems.append(f"the job's directory {chdir} (chdir) does not exist here")
    scheme: str | None = None
    if web_config is not None:
        loaded, web_config_problems = check_web_config(web_config)
        problems += web_config_problems
        scheme = None if loaded is None else loaded.scheme
    directory = pathlib.Path(workdir).expanduser()

    torch_version = _distribution_version("torch")
    if torch_version is None:
        problems.append(f"torch is not installed in {sys.executable}")

    gpu_count: int | None = None
    gpu_error: str | None = None
    if gpus is not None:  # NVML is only asked when the inventory declares a GPU count
        gpu_count, gpu_error = nvml_gpu_count()
        if gpu_count is None:
            problems.append(f"expected {gpus} GPUs, NVML unavailable: {gpu_error}")
        elif gpu_count < gpus:
            problems.append(f"expected {gpus} GPUs, NVML sees {gpu_count}")

    ports_taken: list[int] = []
    for port in ports:
        error = bind_error(bind_address, port)
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            ports_taken.append(port)
            problems.append(f"port {port} is in use")
        else:
            problems.append(f"port {port} cannot be bound on {bind_address}: {error.strerror}")

    free_bytes: int | None = None
    try:
        jobfiles.private_dirs(directory)
        with tempfile.TemporaryFile(dir=directory, prefix=".ugro-preflight-"):
            pass
    except UnsafePath as error:
        problems.append(str(error.strerror))
    except OSError as error:
        problems.append(f"{directory} is not writable: {error.strerror or error}")
    with contextlib.suppress(OSError):
        free_bytes = _free_bytes(directory)
    if free_bytes is not None and free_bytes < min_free_bytes:
        problems.append(
            f"only {_gib(free_bytes)} GiB free in {directory} (need {_gib(min_free_bytes)} GiB)"
        )

    stacks_problem = attach_problem()
    if stacks_problem is not None:
        warnings.append(stacks_problem)

    return {
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "ugro_version": _distribution_version("ugro"),
        "torch_version": torch_version,
        "gpus": gpu_count,
        "gpu_error": gpu_error,
        "ports_taken": ports_taken,
        "workdir": str(directory),
        "workdir_free_bytes": free_bytes,
        "metrics_scheme": scheme,  # as the web configuration says; None: not checked
        "problems": problems,
        "warnings": warnings,
    }


def check_web_config(path: str) -> tuple[WebConfig | None, list[str]]:
    """The node's web configuration, loaded as the ranks and the exporter will load it, and
    the problems with it (sentences naming the file and the field).

    It and the private key it names must be the user's alone: the file holds the password
    hashes, and a key that others can read lets them pose as this node's endpoints.
    """
    try:
        loaded = load_web_config(path)
    except WebConfigError as error:
        return None, [f"web_config: {error}"]
    private = [(pathlib.Path(path), "")]
    if loaded.tls is not None:
        private.append((loaded.tls.key_file, "tls_server_config.key_file "))
    problems = []
    for file, field in private:
        what = f"web_config: {path}" + (f": {field}{file}" if field else "")
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
        except OSError as error:  # removed since it was read
            problems.append(f"{what}: {error.strerror}")
            continue
        if mode & 0o077:
            problems.append(
                f"{what} has mode {mode:04o}, open to group or others; it must be its "
                f"owner's alone: chmod 600 {file}"
            )
    return loaded, problems


def _distribution_version(name: str) -> str | None:
    """The installed version, without importing the package (importing torch takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nvml_gpu_count(module: Any = None) -> tuple[int | None, str | None]:
    """``(count, None)``, or ``(None, why)`` when NVML cannot be used on this node.

    Through the exporter's NVML wrapper, so that the agent and the exporter load NVML and read
    its errors one way. Imported here, not at the top: only ``--gpus`` asks NVML anything.
    ``module`` is an NVML binding to use instead of ``pynvml`` (tests pass a scripted one).
    """
    from ugro.exporter.nvml import GpuLost, Nvml, NvmlCallError, NvmlUnavailable, load_module

    try:
        nvml = Nvml(load_module() if module is None else module)
        nvml.init()
    except NvmlUnavailable as error:
        return None, str(error)
    try:
        count = nvml.call("nvmlDeviceGetCount")
    except (GpuLost, NvmlCallError) as error:
        return None, str(error)
    finally:
        nvml.shutdown()
    if count is None:  # the wrapper's "not available here"
        return None, "nvmlDeviceGetCount is not available in this NVML"
    return int(count), None


def _free_bytes(path: pathlib.Path) -> int:
    """Bytes an unprivileged user may still write (f_bavail), like ``df`` reports."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _gib(count: int) -> str:
    return f"{count / 1024**3:.1f}".removesuffix(".0")
