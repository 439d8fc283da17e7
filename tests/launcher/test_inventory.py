"""The inventory loads into typed objects, and every mistake names the file and the field."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from ugro.launcher.inventory import InventoryError, load_inventory

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "launcher" / "inventory.example.yml"


def write(tmp_path: pathlib.Path, data: object) -> pathlib.Path:
    path = tmp_path / "inventory.yml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def minimal(**changes: object) -> dict:
    data = {
        "prometheus": {"targets_dir": "/srv/targets"},
        "nodes": [{"name": "gpu-a", "host": "10.0.0.11"}, {"name": "gpu-b", "host": "gpu-b"}],
    }
    data.update(changes)
    return data


def test_the_shipped_example_loads_with_per_node_overrides():
    inventory = load_inventory(EXAMPLE)
    assert [n.name for n in inventory.nodes] == ["gpu-a", "gpu-b", "gpu-c"]
    gpu_a, _, gpu_c = inventory.nodes
    assert (gpu_a.user, gpu_a.ssh_port, gpu_a.gpus) == ("train", 22, 8)
    assert (gpu_c.user, gpu_c.ssh_port, gpu_c.gpus) == ("ops", 2222, None)
    assert inventory.defaults.env == {"NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "8"}
    assert inventory.defaults.min_free_disk_bytes == 5 * 1024**3
    assert inventory.prometheus.host == "head-node"


def test_defaults_apply_when_fields_are_left_out(tmp_path):
    inventory = load_inventory(write(tmp_path, minimal()))
    assert inventory.defaults.exporter_port == 9490
    assert inventory.defaults.metrics_base_port == 9500
    assert inventory.nodes[0].ssh_port == 22
    assert inventory.prometheus.host is None
    assert not inventory.nodes[0].is_local
    local = load_inventory(write(tmp_path, minimal(nodes=[{"name": "me", "host": "localhost"}])))
    assert local.nodes[0].is_local


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (minimal(nodes=[{"name": "a"}]), "nodes[0].host: missing"),
        (minimal(nodes=[{"name": "a", "host": "h; rm -rf /"}]), "nodes[0].host: expected a host"),
        (minimal(nodes=[{"name": "a b", "host": "h"}]), "nodes[0].name: expected a node name"),
        (minimal(nodes=[{"name": "a", "host": "h", "ssh_port": 70000}]),
         "nodes[0].ssh_port: expected an integer in 1..65535, got 70000"),
        (minimal(nodes=[{"name": "a", "host": "h", "gpus": "eight"}]),
         "nodes[0].gpus: expected an integer in 0..64"),
        (minimal(nodes=[{"name": "a", "host": "h", "colour": "red"}]),
         "nodes[0]: unknown field(s) colour"),
        (minimal(nodes=[{"name": "a", "host": "h"}, {"name": "a", "host": "i"}]),
         "nodes: duplicate name(s) a"),
        (minimal(nodes=[]), "nodes: expected a non-empty list"),
        (minimal(defaults={"python": "python3"}), "defaults.python: expected an absolute path"),
        (minimal(defaults={"workdir": "/tmp/$(id)"}), "defaults.workdir: expected an absolute"),
        (minimal(defaults={"metrics_base_port": 0}), "defaults.metrics_base_port: expected an"),
        (minimal(defaults={"env": {"BAD NAME": "x"}}), "is not an environment name"),
        (minimal(defaults={"env": {"A": "two\nlines"}}), "defaults.env.A: expected a one-line"),
        (minimal(prometheus={"host": "h"}), "prometheus.targets_dir: missing"),
        (minimal(prometheus={"targets_dir": "/t", "grafana_url": "ftp://x"}),
         "prometheus.grafana_url: expected an http(s) URL"),
        ({"nodes": [{"name": "a", "host": "h"}]}, "prometheus: missing"),
        ("nodes: [unclosed", "not valid YAML"),
        ("- a list", "inventory: expected a mapping"),
    ],
)  # fmt: skip
def test_mistakes_name_the_file_and_field(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(InventoryError) as error:
        load_inventory(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InventoryError, match=r"nope\.yml: cannot read the inventory"):
        load_inventory(tmp_path / "nope.yml")


def test_unknown_node_lists_the_known_ones(tmp_path):
    inventory = load_inventory(write(tmp_path, minimal()))
    with pytest.raises(InventoryError, match=r"no node named 'gpu-z' \(known: gpu-a, gpu-b\)"):
        inventory.node("gpu-z")


def test_ranks_run_unbuffered_in_the_jobs_directory_unless_told_otherwise(tmp_path):
    from ugro.launcher.launch import JobPlan

    inventory = load_inventory(write(tmp_path, minimal(defaults={"chdir": "~/nanogpt"})))
    assert inventory.defaults.chdir == "~/nanogpt"
    plan = JobPlan("j", inventory, inventory.nodes, 1, ("train.py",), 29500, "/srv/nanogpt")
    assert plan.environment(inventory.nodes[0])["PYTHONUNBUFFERED"] == "1"
    buffered = load_inventory(write(tmp_path, minimal(defaults={"env": {"PYTHONUNBUFFERED": ""}})))
    plan = JobPlan("j", buffered, buffered.nodes, 1, ("train.py",), 29500)
    assert plan.environment(buffered.nodes[0])["PYTHONUNBUFFERED"] == ""
    with pytest.raises(InventoryError, match=r"defaults\.chdir: expected an absolute path"):
        load_inventory(write(tmp_path, minimal(defaults={"chdir": "nanogpt"})))
