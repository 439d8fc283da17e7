"""ugro-launch refuses bad input with one line, before it records or starts anything.

Each case runs ugro-launch as a user would, on localhost nodes (no SSH), and checks that no
job record, node work folder or Prometheus target was written.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import yaml

LAUNCH = [sys.executable, "-m", "ugro.launcher.cli"]


def refused(tmp_path: pathlib.Path, nodes: list[dict], *args: str, python: str = "") -> str:
    """Runs ``ugro-launch run`` with ``args``; asserts it was refused with exit code 2 and
    left nothing behind, and returns its one line of error."""
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                # A Python that cannot start: anything that got as far as a node would fail
                # there, with exit code 1, instead of starting a job.
                "defaults": {
                    "python": python or str(tmp_path / "no-python"),
                    "workdir": str(tmp_path / "work"),
                    "min_free_disk_gb": 0,
                },
                "prometheus": {"targets_dir": str(tmp_path / "targets")},
                "nodes": nodes,
            }
        )
    )
    state = tmp_path / "state"
    result = subprocess.run(
        [*LAUNCH, "run", f"--inventory={inventory}", "--job-id=bad-input", *args,
         "--", "-m", "ugro.trainer.train"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "UGRO_STATE_DIR": str(state)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr + result.stdout
    assert result.stdout == ""  # not even "launching"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ugro-launch: "), result.stderr
    assert not (state.exists() and any(state.iterdir())), "a job record was written"
    assert not (tmp_path / "work").exists() and not (tmp_path / "targets").exists()
    return lines[0]


TWO_NODES = [{"name": "here", "host": "localhost"}, {"name": "far", "host": "203.0.113.7"}]


@pytest.mark.parametrize("value", [",", "here,,far", "", "here,"])
def test_nodes_with_an_empty_name_are_refused(tmp_path, value):
    line = refused(tmp_path, TWO_NODES, f"--nodes={value}")
    assert f"--nodes {value!r}: expected node names separated by commas, none empty" in line


def test_a_node_named_twice_is_refused(tmp_path):
    line = refused(tmp_path, TWO_NODES, "--nodes=here,far, here")
    assert line.endswith("here named twice")


def test_two_nodes_on_this_machine_are_refused(tmp_path):
    nodes = [{"name": "here", "host": "localhost"}, {"name": "me", "host": "127.0.0.1"}]
    line = refused(tmp_path, nodes, "--nproc-per-node=2")
    assert "nodes here (localhost) and me (127.0.0.1) are both this machine" in line
    assert "the same ports 9500..9501" in line


def test_a_python_under_home_is_refused_with_the_full_path_asked_for(tmp_path):
    line = refused(tmp_path, [{"name": "here", "host": "localhost"}], python="~/venv/bin/python")
    assert "defaults.python: expected an absolute path, got '~/venv/bin/python'" in line
    assert "write the full path" in line


@pytest.mark.parametrize("flag", ["--job-id=ok\n", "--chdir=/srv/run\n"])
def test_a_value_ending_in_a_newline_is_refused(tmp_path, flag):
    # re.match with ^...$ accepts "ok\n": the job would create a directory and a label with a
    # newline in it. Every pattern matches the whole value.
    line = refused(tmp_path, [{"name": "here", "host": "localhost"}], flag)
    assert repr(flag.split("=", 1)[1]) in line
