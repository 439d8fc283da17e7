"""Reading a hand-edited YAML file (inventory, thresholds) is bounded in time and memory.

A few hundred bytes of nested YAML aliases expand to hundreds of millions of values ("billion
laughs"); a binary or huge file, deep nesting or an unconvertible scalar must be one error line
naming the file, not a traceback, a hang or gigabytes of memory.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable

import pytest

from tests.support.hostile_files import BINARY, billion_laughs
from ugro.catalogue.thresholds import THRESHOLDS_FILE, ThresholdsError, load_thresholds
from ugro.common.config_files import MAX_CONFIG_BYTES, MAX_NESTING
from ugro.launcher.inventory import InventoryError, load_inventory

INVENTORY = """\
prometheus: {targets_dir: /srv/targets}
defaults: {python: /usr/bin/python3}
nodes:
  - {name: gpu-a, host: 10.0.0.11, gpus: 8}
"""
THRESHOLDS = THRESHOLDS_FILE.read_text()
LOADERS: dict[str, Callable[[pathlib.Path], object]] = {
    "inventory": load_inventory,
    "thresholds": load_thresholds,
}
ERRORS = {"inventory": InventoryError, "thresholds": ThresholdsError}


# The bomb where each file's loader would put it into an error message or walk it.
BOMBS = {
    "inventory node gpus": ("inventory", INVENTORY.replace("gpus: 8", f"gpus: {billion_laughs()}")),
    "inventory python": (
        "inventory",
        INVENTORY.replace("python: /usr/bin/python3", f"python: {billion_laughs()}"),
    ),
    "thresholds ratio": (
        "thresholds",
        THRESHOLDS.replace("straggler_ratio: 0.8", f"straggler_ratio: {billion_laughs()}"),
    ),
    "thresholds runbook_base_url": (
        "thresholds",
        THRESHOLDS.replace(
            "runbook_base_url: alerts/runbook.md", f"runbook_base_url: {billion_laughs()}"
        ),
    ),
}

# Loads one file in a child process that cannot grow by more than LIMIT_BYTES of address space
# (an unbounded expansion dies there with MemoryError instead of swapping the machine), and
# reports the error, the time and the peak of Python allocations during the load.
LIMIT_BYTES = 256 * 1024 * 1024
CHILD = textwrap.dedent(
    """
    import json, pathlib, resource, sys, time, tracemalloc
    from ugro.catalogue.thresholds import load_thresholds
    from ugro.launcher.inventory import load_inventory

    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[0])
    limit = pages * resource.getpagesize() + int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    load = {"inventory": load_inventory, "thresholds": load_thresholds}[sys.argv[1]]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        load(pathlib.Path(sys.argv[2]))
        message = None
    except ValueError as error:
        message = str(error)
    seconds = time.perf_counter() - started
    print(json.dumps({"message": message, "seconds": seconds,
                      "peak_bytes": tracemalloc.get_traced_memory()[1]}))
    """
)


@pytest.mark.parametrize("case", list(BOMBS))
def test_an_alias_bomb_is_refused_quickly_in_little_memory(
    tmp_path: pathlib.Path, case: str
) -> None:
    kind, text = BOMBS[case]
    assert len(billion_laughs()) < 515  # the size the issue reported
    path = tmp_path / f"{kind}.yml"
    path.write_text(text)
    try:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, kind, str(path), str(LIMIT_BYTES)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {case} did not finish within 30 s")
    assert result.returncode == 0, f"the load died (out of memory?):\n{result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    message = report["message"]
    assert message is not None, "the bomb was accepted"
    assert str(path) in message and "aliases" in message and "not accepted" in message
    assert "\n" not in message and len(message) < len(str(path)) + 200, message
    assert report["seconds"] < 2, report
    assert report["peak_bytes"] < 4 * 1024 * 1024, report


@pytest.mark.parametrize("kind", list(LOADERS))
def test_a_binary_file_is_one_clear_error(tmp_path: pathlib.Path, kind: str) -> None:
    path = tmp_path / f"{kind}.yml"
    path.write_bytes(BINARY)
    with pytest.raises(ERRORS[kind]) as raised:
        LOADERS[kind](path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert "is not UTF-8 text (byte 0): a binary file?" in message


@pytest.mark.parametrize("kind", list(LOADERS))
def test_a_huge_file_is_refused_without_reading_it(tmp_path: pathlib.Path, kind: str) -> None:
    """A sparse 4 GiB file: the loader reads at most the cap, then says what is wrong."""
    path = tmp_path / f"{kind}.yml"
    with path.open("wb") as handle:
        handle.truncate(4 * 1024**3)
    tracemalloc.start()
    try:
        with pytest.raises(ERRORS[kind]) as raised:
            LOADERS[kind](path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(raised.value) == (
        f"{path}: the {'inventory' if kind == 'inventory' else 'thresholds file'} is larger "
        f"than {MAX_CONFIG_BYTES // 1024} KiB: not a ugro file?"
    )
    assert peak < 3 * MAX_CONFIG_BYTES


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("[" * 5000, f"nested deeper than {MAX_NESTING} levels (line 1, column"),
        ("nodes: " + "9" * 5000, "cannot read this value: Exceeds the limit"),
        ("nodes: 2024-13-45", "cannot read this value: month must be in 1..12 (line 1, column 8)"),
    ],
    ids=["deep nesting", "5000-digit integer", "impossible date"],
)
@pytest.mark.parametrize("kind", list(LOADERS))
def test_yaml_that_python_cannot_build_is_one_clear_error(
    tmp_path: pathlib.Path, kind: str, text: str, detail: str
) -> None:
    """These raised RecursionError or a bare ValueError from inside PyYAML: a traceback."""
    path = tmp_path / f"{kind}.yml"
    path.write_text(text)
    with pytest.raises(ERRORS[kind]) as raised:
        LOADERS[kind](path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "is not valid YAML: " in message
    assert detail in message and "\n" not in message


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text("nodes: [unclosed\n")
    with pytest.raises(InventoryError) as raised:
        load_inventory(path)
    assert str(raised.value) == (
        f"{path}: the inventory is not valid YAML: while parsing a flow sequence: "
        "expected ',' or ']', but got '<stream end>' (line 2, column 1)"
    )


# -- the command-line tools that read these files ----------------------------------------------


def _one_error_line(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == "", "something was started or printed before the error"
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(prefix), result.stderr
    return result.stderr


def test_ugro_launch_reports_a_binary_inventory_in_one_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "inventory.yml"
    path.write_bytes(BINARY)
    ugro_launch = pathlib.Path(sys.executable).parent / "ugro-launch"
    result = subprocess.run(
        [str(ugro_launch), "-i", str(path), "--nodes", "gpu-a", "--", "-m", "ugro.trainer.train"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "UGRO_STATE_DIR": str(tmp_path / "state")},
    )
    error = _one_error_line(result, f"ugro-launch: {path}: the inventory is not UTF-8 text")
    assert "a binary file?" in error
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_ugro_alerts_reports_a_binary_thresholds_file_in_one_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "thresholds.yml"
    path.write_bytes(BINARY)
    result = subprocess.run(
        [sys.executable, "-m", "ugro.alerts", "check", "--thresholds", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    error = _one_error_line(result, f"ugro.alerts: {path}: the thresholds file is not UTF-8 text")
    assert "a binary file?" in error
