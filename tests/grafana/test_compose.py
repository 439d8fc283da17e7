"""The head-node stack: docker-compose.yml and Grafana's provisioning, checked offline.

No Docker engine runs here, so the stack itself never starts in these tests. What can be
checked without one is:

* ``docker-compose config -q`` accepts the file, with and without the gpu profile;
* every folder a service mounts exists in the repository or is a documented, git-ignored
  path the user creates, and every file the configs name resolves through the mounts to a
  file in the repository (or a documented user-created one);
* images are pinned, and Grafana's matches the grafana-foundation-sdk the dashboards use;
* the provisioned datasources have the fixed uids the dashboards name, and the dashboard
  provider reads the folder compose mounts grafana/dashboards at;
* the real ``promtool`` and ``amtool`` accept the configs laid out as the containers see them;
* tests/support/servers.py picks a binary on PATH, else the compose file's images, else skips.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import posixpath
import re
import shutil
import subprocess
import tomllib
from typing import Any

import pytest
import yaml

from tests.support import servers

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROVISIONING = ROOT / "grafana" / "provisioning"
DATASOURCES = PROVISIONING / "datasources" / "ugro.yml"
DASHBOARD_PROVIDERS = PROVISIONING / "dashboards" / "ugro.yml"
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"

# Paths that are not in the repository because the user (or ugro-launch) creates them on the
# head node, each with the document that tells how. All are ignored by git, so a secret or a
# target file is never committed.
# Each maps to (the document, what it says).
USER_CREATED = {
    # file_sd targets, written by ugro-launch; made before `up`, or Docker makes it as root.
    "prometheus/targets": ("docker-compose.yml", "mkdir -p prometheus/targets"),
    # Alertmanager's secrets, read through the alerts/ mount.
    "alerts/secrets/slack_webhook_url": ("alerts/secrets/README.md", "`slack_webhook_url`"),
    "alerts/secrets/smtp_password": ("alerts/secrets/README.md", "`smtp_password`"),
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def load(path: pathlib.Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE_FILE)


def with_defaults(text: str) -> str:
    """``${VAR:-default}`` as compose reads it when VAR is unset (``${VAR}``: empty)."""
    return _VARIABLE.sub(lambda match: match.group(2) or "", text)


def bind_mounts(service: dict[str, Any]) -> list[tuple[pathlib.Path, str]]:
    """A service's bind mounts as (host path, container path); named volumes left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = with_defaults(volume).split(":")
        if source.startswith((".", "/")):
            mounts.append(((ROOT / source).resolve(), target))
    return mounts


def on_host(service: dict[str, Any], container_path: str) -> pathlib.Path:
    """Where a path inside the service's container comes from: the deepest mount holding it."""
    container_path = posixpath.normpath(container_path)
    holders = [
        (target, source)
        for source, target in bind_mounts(service)
        if container_path == target or container_path.startswith(target + "/")
    ]
    assert holders, f"{container_path} is in no bind mount of {service['image']}"
    target, source = max(holders, key=lambda holder: len(holder[0]))
    return source / posixpath.relpath(container_path, target)


def flag(service: dict[str, Any], name: str) -> str:
    values = [a.split("=", 1)[1] for a in service["command"] if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{service['image']}: expected one {name}=, got {values}"
    return with_defaults(values[0])


def in_repository_or_user_created(path: pathlib.Path) -> None:
    relative = path.relative_to(ROOT).as_posix()
    if relative in USER_CREATED:
        document, says = USER_CREATED[relative]
        assert says in (ROOT / document).read_text(), (
            f"{relative} is created by the user, but {document} does not say how"
        )
        # As a file or as a folder (.gitignore's "prometheus/targets/" matches only folders).
        ignored = subprocess.run(
            ["git", "check-ignore", relative, f"{relative}/"],
            cwd=ROOT,
            capture_output=True,
            check=False,
        )
        assert ignored.returncode == 0, f"{relative} is created by the user but not git-ignored"
    else:
        assert path.exists(), f"{relative} is mounted or named by a config but does not exist"


# -- the compose file ------------------------------------------------------------------------


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_docker_compose_accepts_the_file(profile: list[str]) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed: `make setup` installs the Debian package")
    # Defaults only: a developer's UGRO_* settings must not decide whether this passes.
    env = {k: v for k, v in os.environ.items() if not k.startswith("UGRO_")}
    result = subprocess.run(
        [binary, "-f", COMPOSE_FILE.name, *profile, "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_every_service_uses_the_host_network(compose) -> None:
    # The configs' localhost URLs (prometheus.yml, the datasources) rely on it.
    for name, service in compose["services"].items():
        assert service.get("network_mode") == "host", name


def test_images_are_pinned(compose) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} is not pinned"
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-slim)?", tag), f"{name}: {image}"


def test_grafana_matches_the_dashboard_sdk(compose) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [
        requirement
        for requirements in pyproject["project"]["optional-dependencies"].values()
        for requirement in requirements
        if requirement.startswith("grafana-foundation-sdk==")
    ]
    assert len(pins) == 1, pins
    # "grafana-foundation-sdk==1769699379!11.6.0": a build epoch, then the Grafana version.
    sdk_version = pins[0].split("==", 1)[1].rpartition("!")[2]
    grafana_tag = compose["services"]["grafana"]["image"].rpartition(":")[2]
    assert grafana_tag.split(".")[:2] == sdk_version.split(".")[:2]


def test_mounted_folders_exist_or_are_documented(compose) -> None:
    for name, service in compose["services"].items():
        for source, _ in bind_mounts(service):
            assert source.is_relative_to(ROOT), f"{name}: {source} is outside the repository"
            in_repository_or_user_created(source)
        for target in service.get("tmpfs", []):
            # A mount point inside a read-only mount must already exist there.
            assert on_host(service, target).is_dir(), f"{name}: tmpfs {target}"


def test_prometheus_finds_its_files_through_the_mounts(compose) -> None:
    service = compose["services"]["prometheus"]
    container_config = flag(service, "--config.file")
    config = load(on_host(service, container_config))
    assert on_host(service, container_config) == PROMETHEUS_CONFIG
    folder = posixpath.dirname(container_config)
    for rule_file in config["rule_files"]:
        in_repository_or_user_created(on_host(service, posixpath.join(folder, rule_file)))
    targets_mount = next(t for s, t in bind_mounts(service) if s == ROOT / "prometheus/targets")
    for job in config["scrape_configs"]:
        for file_sd in job.get("file_sd_configs", []):
            for pattern in file_sd["files"]:
                # Under the folder ugro-launch writes to, not inside the read-only config.
                path = posixpath.join(folder, pattern)
                assert path.startswith(targets_mount + "/"), f"{job['job_name']}: {pattern}"
    assert flag(service, "--storage.tsdb.retention.time")
    assert "--web.enable-lifecycle" in service["command"]


def test_alertmanager_finds_its_files_through_the_mounts(compose) -> None:
    service = compose["services"]["alertmanager"]
    container_config = flag(service, "--config.file")
    config = load(on_host(service, container_config))
    folder = posixpath.dirname(container_config)
    for pattern in config["templates"]:
        host_pattern = on_host(service, posixpath.join(folder, pattern))
        matches = fnmatch.filter(os.listdir(host_pattern.parent), host_pattern.name)
        assert matches, f"{pattern} matches no file in {host_pattern.parent}"
    secrets = [config["global"]["smtp_auth_password_file"]]
    secrets += [
        slack["api_url_file"]
        for receiver in config["receivers"]
        for slack in receiver.get("slack_configs", [])
    ]
    for secret in secrets:
        in_repository_or_user_created(on_host(service, posixpath.join(folder, secret)))
    assert "--cluster.listen-address=" in service["command"]


def test_grafana_reads_the_repository_provisioning_and_dashboards(compose) -> None:
    service = compose["services"]["grafana"]
    assert on_host(service, "/etc/grafana/provisioning") == PROVISIONING
    home = on_host(service, service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == ROOT / "grafana" / "dashboards" / "ugro-training.json"
    if home.exists():  # generated by `python -m ugro.grafana build`
        assert json.loads(home.read_text())["uid"] == "ugro-training"


# -- Grafana provisioning --------------------------------------------------------------------


def test_datasources_have_the_uids_the_dashboards_use() -> None:
    provisioning = load(DATASOURCES)
    assert provisioning["apiVersion"] == 1
    by_uid = {source["uid"]: source for source in provisioning["datasources"]}
    assert set(by_uid) == {"ugro-prometheus", "ugro-alertmanager"}
    prometheus, alertmanager = by_uid["ugro-prometheus"], by_uid["ugro-alertmanager"]
    assert (prometheus["type"], prometheus["isDefault"]) == ("prometheus", True)
    assert alertmanager["type"] == "alertmanager"
    assert alertmanager["jsonData"] == {
        "implementation": "prometheus",
        "handleGrafanaManagedAlerts": False,
    }


def test_datasources_point_where_prometheus_yml_does() -> None:
    by_uid = {source["uid"]: source for source in load(DATASOURCES)["datasources"]}
    config = load(PROMETHEUS_CONFIG)
    own_target = next(
        job["static_configs"][0]["targets"][0]
        for job in config["scrape_configs"]
        if job["job_name"] == "prometheus"
    )
    alertmanager_target = config["alerting"]["alertmanagers"][0]["static_configs"][0]
    assert by_uid["ugro-prometheus"]["url"] == f"http://{own_target}"
    assert by_uid["ugro-alertmanager"]["url"] == f"http://{alertmanager_target['targets'][0]}"
    # $__rate_interval and the smallest step follow the scrape interval.
    assert (
        by_uid["ugro-prometheus"]["jsonData"]["timeInterval"]
        == (config["global"]["scrape_interval"])
    )


def test_dashboards_default_to_a_provisioned_datasource() -> None:
    provisioned = {(s["type"], s["uid"], s["name"]) for s in load(DATASOURCES)["datasources"]}
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        variables = json.loads(path.read_text())["templating"]["list"]
        for variable in (v for v in variables if v["type"] == "datasource"):
            current = variable["current"]
            default = (variable["query"], current["value"], current["text"])
            assert default in provisioned, f"{path.name}: ${variable['name']} = {default}"


def test_dashboard_provider_reads_the_mounted_dashboards(compose) -> None:
    provisioning = load(DASHBOARD_PROVIDERS)
    assert provisioning["apiVersion"] == 1
    [provider] = provisioning["providers"]
    assert (provider["name"], provider["folder"], provider["type"]) == ("ugro", "ugro", "file")
    assert provider["allowUiUpdates"] is False
    assert provider["options"]["foldersFromFilesStructure"] is False
    assert 0 < provider["updateIntervalSeconds"] <= 60
    grafana = compose["services"]["grafana"]
    assert on_host(grafana, provider["options"]["path"]) == ROOT / "grafana" / "dashboards"


# -- the configs as the containers see them -------------------------------------------------


def container_layout(service: dict[str, Any], into: pathlib.Path) -> None:
    """Copies a service's bind mounts to ``into`` + their container paths, without the
    user's own files: target files and secrets stay where they are."""
    for source, target in sorted(bind_mounts(service), key=lambda mount: mount[1]):
        destination = into / target.lstrip("/")
        if source.is_dir():
            shutil.copytree(
                source,
                destination,
                ignore=shutil.ignore_patterns("targets", "secrets", "__pycache__"),
                dirs_exist_ok=True,
            )
        destination.mkdir(parents=True, exist_ok=True)  # a user-created folder: empty


def test_promtool_accepts_the_config_as_mounted(compose, tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: run `make setup` (Debian package prometheus)")
    service = compose["services"]["prometheus"]
    container_layout(service, tmp_path)
    config = tmp_path / flag(service, "--config.file").lstrip("/")
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Both rule files were found and checked, through the side-by-side layout.
    assert "2 rule files found" in result.stdout + result.stderr, result.stdout + result.stderr


def test_amtool_accepts_the_config_as_mounted(compose, tmp_path) -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail("amtool is not on PATH: run `make setup` (prometheus-alertmanager)")
    service = compose["services"]["alertmanager"]
    container_layout(service, tmp_path)
    config = tmp_path / flag(service, "--config.file").lstrip("/")
    secrets = config.parent / "secrets"
    secrets.mkdir()
    (secrets / "slack_webhook_url").write_text("https://hooks.slack.com/services/T0/B0/x\n")
    (secrets / "smtp_password").write_text("placeholder")
    result = subprocess.run(
        [amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " - 1 templates" in result.stdout, result.stdout  # the glob found ugro.tmpl


# -- tests/support/servers.py: how the suite's server fixtures start Prometheus and Alertmanager


def test_fixture_images_are_the_compose_pins(compose) -> None:
    for name in servers.BINARIES:
        assert servers.compose_image(name) == compose["services"][name]["image"]


def test_a_binary_on_path_is_used(tmp_path, monkeypatch) -> None:
    for binary in ("prometheus", "alertmanager", "prometheus-alertmanager"):
        (tmp_path / binary).write_text("#!/bin/sh\n")
        (tmp_path / binary).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert servers.server("prometheus") == servers.LocalBinary(str(tmp_path / "prometheus"))
    # Debian's name first; upstream's when it is the only one.
    wanted = servers.LocalBinary(str(tmp_path / "prometheus-alertmanager"))
    assert servers.server("alertmanager") == wanted
    (tmp_path / "prometheus-alertmanager").unlink()
    assert servers.server("alertmanager") == servers.LocalBinary(str(tmp_path / "alertmanager"))


def test_the_compose_image_runs_where_only_docker_is(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(servers, "docker_engine_problem", lambda: None)
    for name in servers.BINARIES:
        assert servers.server(name) == servers.ComposeImage(servers.compose_image(name))


def test_the_container_shares_the_hosts_network_paths_and_user(tmp_path) -> None:
    image = servers.ComposeImage("prom/prometheus:v3.5.0")
    command, volumes, arguments = image.container_settings(["--flag=1"], [tmp_path], [ROOT])
    assert command == ["--flag=1"]  # the image's entrypoint is the server
    assert volumes == [(str(tmp_path), str(tmp_path), "rw"), (str(ROOT), str(ROOT), "ro")]
    assert arguments == {"network": "host", "user": f"{os.getuid()}:{os.getgid()}"}


def test_skips_without_binary_or_docker_engine(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    for name, binaries in servers.BINARIES.items():
        with pytest.raises(pytest.skip.Exception) as skipped:
            servers.server(name)
        reason = str(skipped.value)
        assert f"neither {' nor '.join(binaries)} on PATH nor a Docker engine" in reason
        assert "no engine answers" in reason


def test_a_local_server_process_stops(tmp_path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    process = servers.LocalBinary(sleep).start(["60"], tmp_path / "log")
    assert process.poll() is None
    process.stop(grace=5)
    assert process.returncode == -15  # SIGTERM to the process group
