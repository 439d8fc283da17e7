"""The inventory loads into typed objects, and every mistake names the file and the field."""

from __future__ import annotations

import ipaddress
import pathlib
import re
import socket
import time

import psutil
import pytest
import yaml

from ugro.launcher.inventory import (
    THIS_MACHINE,
    InventoryError,
    Node,
    inventory_from_data,
    load_inventory,
    same_machine,
)

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
    six = load_inventory(write(tmp_path, minimal(nodes=[{"name": "me", "host": "::1"}])))
    assert six.nodes[0].is_local
    # ~ is expanded where the path is used on this machine (the Prometheus folder here).
    here = load_inventory(write(tmp_path, minimal(prometheus={"targets_dir": "~/targets"})))
    assert here.prometheus.targets_dir == "~/targets"


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
        (minimal(defaults={"python": "~/venv/bin/python"}),
         "defaults.python: expected an absolute path, got '~/venv/bin/python': ~ is not expanded"),
        (minimal(prometheus={"targets_dir": "~/targets", "host": "head"}),
         "prometheus.targets_dir: expected an absolute path on head, got '~/targets'"),
        (minimal(nodes=[{"name": "a", "host": "-oProxyCommand=x"}]),
         "nodes[0].host: expected a host"),
        (minimal(defaults={"workdir": "/tmp/$(id)"}), "defaults.workdir: expected an absolute"),
        # A pattern's $ also matches before a final newline: every pattern must match whole.
        (minimal(defaults={"workdir": "/work\n"}), "defaults.workdir: expected an absolute"),
        (minimal(nodes=[{"name": "a\n", "host": "h"}]), "nodes[0].name: expected a node name"),
        (minimal(nodes=[{"name": "a", "host": "h\n"}]), "nodes[0].host: expected a host"),
        (minimal(defaults={"env": {"A\n": "x"}}), "is not an environment name"),
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


def test_a_large_inventory_loads_and_picks_nodes_in_linear_time():
    # 20,000 nodes: the duplicate-name check and the lookup by name were quadratic (a minute).
    count = 20_000
    data = minimal(nodes=[{"name": f"n{i}", "host": f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}"}
                          for i in range(count)])  # fmt: skip
    began = time.perf_counter()
    inventory = inventory_from_data(pathlib.Path("big.yml"), data)
    picked = [inventory.node(f"n{i}") for i in range(count)]
    elapsed = time.perf_counter() - began
    assert picked == list(inventory.nodes)
    assert elapsed < 3.0, f"{count} nodes took {elapsed:.1f} s"
    data["nodes"].append({"name": "n7", "host": "h"})
    with pytest.raises(InventoryError, match=r"big\.yml: nodes: duplicate name\(s\) n7$"):
        inventory_from_data(pathlib.Path("big.yml"), data)


def node(name: str, host: str) -> Node:
    return Node(name, host, 22, None, None, None)


def own_address() -> str | None:
    """An address of one of this machine's interfaces that is not loopback, if any."""
    for addresses in psutil.net_if_addrs().values():
        for each in addresses:
            if each.family == socket.AF_INET and not ipaddress.ip_address(each.address).is_loopback:
                return each.address
    return None


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("localhost", "127.0.0.1", THIS_MACHINE),
        ("127.0.0.1", "::1", THIS_MACHINE),
        ("::1", "localhost", THIS_MACHINE),
        ("localhost", "127.0.0.2", THIS_MACHINE),  # all of 127/8 is loopback
        ("10.0.0.11", "10.0.0.11", "10.0.0.11"),
        ("gpu-b.invalid", "GPU-B.invalid", "gpu-b.invalid"),  # the same name, even unresolved
    ],
)
def test_two_nodes_on_one_machine_are_found(first, second, shared):
    a, b = node("a", first), node("b", second)
    assert same_machine([a, node("far", "10.0.0.99"), b]) == (a, b, shared)


def test_a_local_node_and_this_machines_own_address_are_one_machine():
    address = own_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    here, again = node("here", "localhost"), node("again", address)
    assert same_machine([here, again]) == (here, again, THIS_MACHINE)


def test_distinct_and_unresolvable_hosts_are_not_a_clash():
    nodes = [node("a", "10.0.0.11"), node("b", "10.0.0.12"), node("me", "localhost"),
             node("x", "nowhere-x.invalid"), node("y", "nowhere-y.invalid")]  # fmt: skip
    assert same_machine(nodes) is None


SLURM_EXAMPLE = EXAMPLE.with_name("inventory.slurm.example.yml")


def test_the_shipped_slurm_example_loads():
    inventory = load_inventory(SLURM_EXAMPLE)
    assert inventory.nodes == ()
    slurm = inventory.slurm
    assert slurm is not None
    assert (slurm.partition, slurm.nodes, slurm.gpus_per_node) == ("gpu", 2, 8)
    assert (slurm.time_limit, slurm.account) == ("12:00:00", "ml-team")
    assert slurm.sbatch_args == ("--exclusive",)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"partition": "gpu; rm -rf /"}, "slurm.partition: expected a Slurm partition name"),
        ({"nodes": 0}, "slurm.nodes: expected an integer in 1..4096"),
        ({"time": "soon"}, "slurm.time: expected a time limit"),
        ({"sbatch_args": "--exclusive"}, "slurm.sbatch_args: expected a list of sbatch long"),
        ({"sbatch_args": ["--qos=high\n--x"]}, "slurm.sbatch_args: expected a list"),
        ({"log_dir": "relative/dir"}, "slurm.log_dir: expected an absolute path"),
        ({"queue": "gpu"}, "slurm: unknown field(s) queue"),
    ],
)
def test_a_bad_slurm_section_names_its_field(tmp_path, section, expected):
    data = {"prometheus": {"targets_dir": "/srv/targets"}, "slurm": section}
    with pytest.raises(InventoryError, match=re.escape(expected)):
        load_inventory(write(tmp_path, data))


def test_the_web_config_is_every_nodes_unless_a_node_names_its_own(tmp_path):
    example = load_inventory(EXAMPLE)
    assert example.defaults.web_config == "/etc/ugro/web-config.yml"
    assert [node.web_config for node in example.nodes] == [
        "/etc/ugro/web-config.yml", "/etc/ugro/web-config.yml", "/opt/ugro/web-config.yml",
    ]  # fmt: skip
    assert load_inventory(SLURM_EXAMPLE).defaults.web_config == "/etc/ugro/web-config.yml"
    plain = load_inventory(write(tmp_path, minimal()))
    assert plain.defaults.web_config is None
    assert {node.web_config for node in plain.nodes} == {None}


def test_the_ranks_get_the_web_config_path_and_nothing_else_of_it(tmp_path):
    from ugro.launcher.agent.slurm_node import parser
    from ugro.launcher.launch import JobPlan
    from ugro.launcher.torchrun import job_environment

    nodes = [{"name": "gpu-a", "host": "10.0.0.11", "web_config": "/srv/a/web.yml"},
             {"name": "gpu-b", "host": "10.0.0.12"}]  # fmt: skip
    data = minimal(defaults={"web_config": "/etc/ugro/web.yml"}, nodes=nodes)
    inventory = load_inventory(write(tmp_path, data))
    plan = JobPlan("j", inventory, inventory.nodes, 1, ("train.py",), 29500)
    assert plan.environment(inventory.nodes[0])["UGRO_WEB_CONFIG"] == "/srv/a/web.yml"
    assert plan.environment(inventory.nodes[1])["UGRO_WEB_CONFIG"] == "/etc/ugro/web.yml"
    assert "UGRO_WEB_CONFIG" not in job_environment("j", "n", 9500, {})
    # A Slurm node's agent is told the path the same way, and gives the ranks the same.
    args = parser().parse_args(
        ["--job-id=j", "--nproc-per-node=1", "--rdzv-port=1", "--metrics-base-port=9500",
         "--web-config=/etc/ugro/web.yml", "--", "train.py"]
    )  # fmt: skip
    environment = job_environment("j", "n", 9500, {}, args.web_config)
    assert environment["UGRO_WEB_CONFIG"] == "/etc/ugro/web.yml"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (minimal(defaults={"web_config": "web.yml"}),
         "defaults.web_config: expected an absolute path of plain characters, got 'web.yml'"),
        (minimal(defaults={"web_config": "~/web.yml"}),
         "defaults.web_config: expected an absolute path, got '~/web.yml': ~ is not expanded"),
        (minimal(defaults={"web_config": 7}), "defaults.web_config: expected an absolute path"),
        (minimal(nodes=[{"name": "a", "host": "h", "web_config": "/etc/$(id)"}]),
         "nodes[0].web_config: expected an absolute path of plain characters"),
        (minimal(nodes=[{"name": "a", "host": "h", "web_config": "~/w.yml"}]),
         "nodes[0].web_config: expected an absolute path, got '~/w.yml'"),
        (minimal(defaults={"env": {"UGRO_WEB_CONFIG": "/etc/ugro/web.yml"}}),
         "defaults.env.UGRO_WEB_CONFIG: not here: name the file as defaults.web_config"),
    ],
)  # fmt: skip
def test_a_bad_web_config_path_names_its_field(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(InventoryError) as error:
        load_inventory(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)
