"""A wheel of ugro, installed away from the checkout, finds every file it reads at run time.

The editable install (make setup) reads the YAML in place, so only a normal install shows a
data file left out of the package data: ``ugro watch`` would then fall back to its built-in
thresholds without a word, and the demo's local stack would find no Prometheus config.

The wheel is built offline, as CI must: ``pip wheel --no-build-isolation --no-index`` with the
setuptools of the test's own environment (build isolation would download setuptools). It is
built from a copy of the distribution's files, so that the checkout gets no build/ or
egg-info, and a stale build/ never adds modules that are gone; decoy secret and target files
in the copy must stay out of it. It is installed into a fresh venv whose only other entry on
the path is a .pth file naming this environment's site-packages, for the third-party
dependencies (installing them offline is not possible): not the checkout, and not the editable
install's finder (a .pth file's directory gets no .pth processing of its own). Every command
runs from a folder outside the checkout.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
# Top-level package -> its folder ("ugro.alerts" -> "alerts"); subpackages live inside.
PACKAGE_DIRS: dict[str, str] = SETUPTOOLS["package-dir"]
# Files the code reads at run time, by their path in the wheel.
RUNTIME_DATA = (
    "ugro/alerts/thresholds.yml",
    "ugro/alerts/rules.yml",
    "ugro/alerts/alertmanager.yml",
    "ugro/alerts/templates/ugro.tmpl",
    "ugro/prometheus/prometheus.yml",
    "ugro/prometheus/rules/recording.yml",
    "ugro/exporter/slurm/prolog.sh",
    "ugro/exporter/slurm/epilog.sh",
)
# Where a user's secrets and the launcher's target files go in a checkout: never packaged.
PRIVATE_DIRS = ("alerts/secrets", "prometheus/targets")
TIMEOUT = 60


@dataclass(frozen=True)
class Installed:
    wheel: pathlib.Path
    source: pathlib.Path  # the copy the wheel was built from
    venv: pathlib.Path
    site_packages: pathlib.Path
    elsewhere: pathlib.Path  # the working directory of every command: not the checkout

    @property
    def python(self) -> pathlib.Path:
        return self.venv / "bin" / "python"

    def run(self, *command: str | pathlib.Path) -> subprocess.CompletedProcess[str]:
        # The checkout must not come in through the environment either.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(
            [str(part) for part in command],
            cwd=self.elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )


def copy_distribution(target: pathlib.Path) -> None:
    """pyproject.toml, the README it names and every package folder, without caches and
    without what PRIVATE_DIRS hold (a developer's secrets are not copied around)."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)

    def ignore(directory: str, names: list[str]) -> list[str]:
        if pathlib.Path(directory).relative_to(ROOT).as_posix() in PRIVATE_DIRS:
            return names
        return [name for name in names if name == "__pycache__" or name.endswith(".pyc")]

    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, target / folder, ignore=ignore)


def run_checked(command: list[str | pathlib.Path], **kwargs: object) -> None:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=TIMEOUT, **kwargs
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    copy_distribution(source)
    for decoy in ("alerts/secrets/slack_webhook_url", "prometheus/targets/ranks/decoy.json"):
        (source / decoy).parent.mkdir(parents=True, exist_ok=True)
        (source / decoy).write_text("decoy\n")

    dist = base / "dist"
    run_checked(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"),
            *("--no-build-isolation", "--wheel-dir", dist, source),
        ],
        cwd=base,
    )
    (wheel,) = dist.glob("ugro-*.whl")

    venv = base / "venv"
    run_checked([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    site_packages = pathlib.Path(subprocess.check_output(purelib, text=True).strip())
    (site_packages / "ugro-test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run_checked(
        [
            *(sys.executable, "-m", "pip", "--python", python, "install", "--quiet"),
            *("--no-deps", "--no-index", wheel),
        ],
        cwd=base,
    )
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return Installed(wheel, source, venv, site_packages, elsewhere)


def test_the_wheel_holds_every_module_and_the_runtime_data(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    # A subpackage missing from [tool.setuptools] packages is silently left out.
    modules = {
        f"ugro/{package.removeprefix('ugro.')}/{path.relative_to(installed.source / folder)}"
        for package, folder in PACKAGE_DIRS.items()
        for path in (installed.source / folder).rglob("*.py")
    }
    assert sorted(modules - names) == []
    assert sorted(name for name in RUNTIME_DATA if name not in names) == []
    for package, patterns in SETUPTOOLS["package-data"].items():
        prefix = f"ugro/{package.removeprefix('ugro.')}/"
        for pattern in patterns:
            assert fnmatch.filter(names, prefix + pattern), f"{package}: {pattern} matches nothing"
    private = [name for name in names if "secrets/" in name or "targets/" in name]
    assert private == []


def test_ugro_is_the_installed_wheel_and_finds_its_data(installed: Installed) -> None:
    program = textwrap.dedent(
        """
        import json, sys
        import yaml
        import ugro.alerts
        from ugro.alerts import rules_file, secret_files
        from ugro.console import localstack, watch

        # The thresholds, read as every caller does, from the default path: a missing file
        # raises here (where a caller that falls back to built-in values would say nothing).
        thresholds_files = []
        for module in [m for name, m in sys.modules.items() if name.startswith("ugro.")]:
            if hasattr(module, "load_thresholds") and hasattr(module, "THRESHOLDS_FILE"):
                module.load_thresholds()
                thresholds_files.append(module.THRESHOLDS_FILE)

        prometheus = yaml.safe_load(localstack.PROMETHEUS_CONFIG.read_text())
        alertmanager = yaml.safe_load(localstack.ALERTMANAGER_CONFIG.read_text())
        print(json.dumps({
            "package": ugro.alerts.__file__,
            "thresholds": [str(path) for path in thresholds_files],
            "files": [str(path) for path in (
                *thresholds_files,
                rules_file.RULES_FILE,
                rules_file.RECORDING_FILE,
                secret_files.ALERTMANAGER_CONFIG,
                localstack.PROMETHEUS_CONFIG,
                localstack.RECORDING_RULES,
                localstack.ALERTMANAGER_CONFIG,
                *(localstack.PROMETHEUS_CONFIG.parent / name for name in prometheus["rule_files"]),
            )],
            # Alertmanager's templates are globs, each to match a shipped file.
            "templates": [
                [str(path) for path in localstack.ALERTMANAGER_CONFIG.parent.glob(pattern)]
                for pattern in alertmanager["templates"]
            ],
        }))
        """
    )
    result = installed.run(installed.python, "-c", program)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    site_packages = installed.site_packages.resolve()
    assert pathlib.Path(found["package"]).resolve().is_relative_to(site_packages)
    assert found["thresholds"], "no module with load_thresholds and THRESHOLDS_FILE was found"
    assert found["templates"] and all(found["templates"]), found["templates"]
    for name in found["files"] + [name for names in found["templates"] for name in names]:
        path = pathlib.Path(name).resolve()
        assert path.is_relative_to(site_packages), name
        assert path.is_file(), name


def test_the_exporter_runs_once(installed: Installed) -> None:
    # No GPU here, or no NVML: the exporter says so in a metric and still serves the host.
    result = installed.run(installed.venv / "bin" / "ugro-exporter", "--once")
    assert result.returncode == 0, result.stderr
    assert "ugro_node_info{" in result.stdout


def test_the_alert_rules_check_passes(installed: Installed) -> None:
    # Missing secret files are warnings without --require-secrets: none are shipped.
    result = installed.run(installed.python, "-m", "ugro.alerts", "check")
    assert result.returncode == 0, result.stderr


def test_ugro_watch_starts(installed: Installed) -> None:
    result = installed.run(installed.venv / "bin" / "ugro", "watch", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
