"""The one way ugro talks to NVML.

Every call goes through ``Nvml.read``/``Nvml.call``: NVML is initialised once (under a lock),
byte strings are decoded, a query the GPU or driver does not support becomes ``None`` (logged
once per query), and a GPU that has fallen off the bus raises ``GpuLost`` so the caller can
report that GPU as lost and keep serving the others. Units are converted at this edge, once:
the collector sees bytes, watts, joules, hertz and ratios.

The NVML module is passed in (``pynvml`` from the ``nvidia-ml-py`` distribution by default), so
tests use a scripted double with the same API instead of patching the real one.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger("ugro.exporter.nvml")

# NVML return codes (nvml.h); stable across driver releases.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

# Codes meaning "this query has no answer on this GPU/driver": leave the series out.
_NOT_AVAILABLE = {NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_NO_PERMISSION}
# Codes meaning "the GPU is gone" (off the bus, or in a state the driver cannot talk to).
_LOST = {NVML_ERROR_GPU_IS_LOST, NVML_ERROR_UNKNOWN}

# Why NVML could not start, as the fixed reason codes the collector exposes.
_INIT_REASONS = {
    NVML_ERROR_LIBRARY_NOT_FOUND: "library_not_found",
    NVML_ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
    NVML_ERROR_NO_PERMISSION: "no_permission",
}


class NvmlUnavailable(Exception):
    """NVML cannot be used on this host; ``reason`` is a fixed code, the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class GpuLost(Exception):
    """The GPU stopped answering (``GPU_IS_LOST`` or ``UNKNOWN``)."""


class NvmlCallError(Exception):
    """Any other NVML failure of one query."""


def load_module(spec: str = "pynvml") -> Any:
    """Import the NVML binding: a module name, or ``module:factory`` for a factory's result."""
    module_name, _, factory = spec.partition(":")
    try:
        module: ModuleType = importlib.import_module(module_name)
    except ImportError as error:
        raise NvmlUnavailable(
            "module_missing", f"cannot import {module_name!r}: {error} (pip install nvidia-ml-py)"
        ) from error
    return getattr(module, factory)() if factory else module


def _decode(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class Nvml:
    """A thread-safe, initialise-once view of one NVML binding."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self._lock = threading.Lock()
        self._initialised = False
        self._unsupported_logged: set[str] = set()

    @property
    def module(self) -> Any:
        return self._module

    def init(self) -> None:
        """Initialise NVML once; raises ``NvmlUnavailable`` with a reason code when it cannot."""
        with self._lock:
            if self._initialised:
                return
            try:
                self._module.nvmlInit()
            except self._module.NVMLError as error:
                code = getattr(error, "value", None)
                raise NvmlUnavailable(
                    _INIT_REASONS.get(code, "init_failed"), f"nvmlInit failed: {error}"
                ) from error
            except OSError as error:  # the shared library exists but cannot be loaded
                raise NvmlUnavailable("library_not_found", f"nvmlInit failed: {error}") from error
            self._initialised = True

    def shutdown(self) -> None:
        with self._lock:
            if self._initialised:
                self._initialised = False
                try:
                    self._module.nvmlShutdown()
                except self._module.NVMLError as error:
                    log.debug("nvmlShutdown: %s", error)

    def call(self, function: str, *args: Any) -> Any:
        """``module.function(*args)`` with NVML errors mapped; None when not available."""
        module = self._module
        try:
            method: Callable[..., Any] = getattr(module, function)
        except AttributeError:  # an older binding without this query
            self._log_unsupported(function, "not in this NVML binding")
            return None
        try:
            return _decode(method(*args))
        except module.NVMLError as error:
            code = getattr(error, "value", None)
            if code in _NOT_AVAILABLE:
                self._log_unsupported(function, str(error))
                return None
            if code in _LOST:
                raise GpuLost(f"{function}: {error}") from error
            raise NvmlCallError(f"{function}: {error}") from error

    def _log_unsupported(self, function: str, why: str) -> None:
        if function not in self._unsupported_logged:
            self._unsupported_logged.add(function)
            log.info("NVML %s is not available here (%s); its series are left out", function, why)

    @property
    def unsupported(self) -> frozenset[str]:
        """The queries found unavailable so far (for logs and the closing verification)."""
        return frozenset(self._unsupported_logged)

    def is_timeout(self, error: BaseException) -> bool:
        return getattr(error, "value", None) == NVML_ERROR_TIMEOUT
