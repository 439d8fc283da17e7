"""Which ugro package may import which, read from the source with ``ast`` (ARCHITECTURE.md).

* ``ugro.trainer`` runs inside every training process and ``ugro.exporter`` on every node:
  neither imports another ugro package, except the modules of ``ugro.common`` that themselves
  import only the standard library and the few packages an endpoint needs on every node
  (``NODE_PACKAGES``: prometheus_client to serve, PyYAML and bcrypt to read a web
  configuration). A module of ugro.common that needs anything else stays out of their reach.
* ``ugro.exporter`` never imports torch: it starts in well under a second on hosts without it.
* No shipped module imports a ``__main__`` module: a ``__main__`` only calls ``main()`` from a
  module of its own package, so importing a function never runs, or depends on, an entry point.
  (Tests of a command line may import the one they test.)

Every import counts, also one inside a function: a lazy import still ties the packages.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Top-level package -> its folder, as the distribution maps them.
PACKAGE_DIRS: dict[str, pathlib.Path] = {
    name: ROOT / folder
    for name, folder in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ].items()
}
ISOLATED = ("ugro.trainer", "ugro.exporter")
NODE_PACKAGES = {"prometheus_client", "yaml", "bcrypt"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, "ugro.trainer.telemetry"
    target: str  # an imported module (or a name in one), resolved: "ugro.common.messages"
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_name(package: str, path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE_DIRS[package]).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def modules(package: str) -> dict[str, pathlib.Path]:
    """Every module of a package and its subpackages: name -> file."""
    return {
        module_name(package, path): path
        for path in sorted(PACKAGE_DIRS[package].rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def imports(module: str, path: pathlib.Path) -> Iterator[Import]:
    """Every import in the file, relative ones resolved; ``from M import x`` yields both M and
    M.x, as x may be a submodule (``from ugro.alerts import __main__``)."""
    # The package that relative imports start from: the module's own for an __init__.
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if source == "__future__":
                continue
            yield Import(module, source, node.lineno)
            for alias in node.names:
                if alias.name != "*":
                    yield Import(module, f"{source}.{alias.name}", node.lineno)


def all_imports(package: str) -> list[Import]:
    return [found for name, path in modules(package).items() for found in imports(name, path)]


def within(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def beyond_a_node(target: str) -> bool:
    """Whether importing ``target`` needs a package that a node may not have (ugro's own
    modules are judged by what they import)."""
    top = target.split(".")[0]
    return top not in (*sys.stdlib_module_names, *NODE_PACKAGES, "ugro")


def dependency_free_common_modules() -> set[str]:
    """The modules of ugro.common that import nothing but the standard library, NODE_PACKAGES
    and other such modules of ugro.common."""
    targets = {
        name: {found.target for found in imports(name, path)}
        for name, path in modules("ugro.common").items()
    }

    free = {name for name, found in targets.items() if not any(map(beyond_a_node, found))}
    # A module importing a ugro.common module is free only while that module is (a fixpoint).
    while True:
        kept = {
            name
            for name in free
            if all(
                target in free or target.rpartition(".")[0] in free or not within(target, "ugro")
                for target in targets[name]
            )
        }
        if kept == free:
            return free
        free = kept


def test_the_package_map_names_the_isolated_packages() -> None:
    for package in (*ISOLATED, "ugro.common"):
        assert modules(package), f"{package}: no modules found under {PACKAGE_DIRS[package]}"


def test_the_dependency_free_common_modules_are_found() -> None:
    # The rule below would otherwise pass by allowing nothing, or everything.
    free = dependency_free_common_modules()
    assert "ugro.common.messages" in free
    assert "ugro.common.web_config" in free  # PyYAML, bcrypt and ugro.common.config_files
    assert [beyond_a_node(name) for name in ("fabric", "rich.table", "torch", "os.path")] == [
        True,
        True,
        True,
        False,
    ]


def allowed_from_elsewhere(target: str, free: set[str]) -> bool:
    """Whether an isolated package may import ``target`` from outside itself: a dependency-free
    common module, or a name in one (``from ugro.common.messages import shown``) that is not
    itself a module (``from ugro.common import config_files``)."""
    if target in free:
        return True
    return target not in modules("ugro.common") and target.rpartition(".")[0] in free


@pytest.mark.parametrize("package", ISOLATED)
def test_trainer_and_exporter_import_no_other_ugro_package(package: str) -> None:
    free = dependency_free_common_modules()
    wrong = [
        str(found)
        for found in all_imports(package)
        if within(found.target, "ugro")
        and not within(found.target, package)
        and not allowed_from_elsewhere(found.target, free)
    ]
    assert not wrong, f"{package} may import only itself and {sorted(free)}:\n" + "\n".join(wrong)


def test_the_exporter_never_imports_torch() -> None:
    wrong = [str(found) for found in all_imports("ugro.exporter") if within(found.target, "torch")]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", ISOLATED)
def test_importing_every_module_loads_no_other_ugro_package(package: str) -> None:
    # The same rules at run time, where an import through a third-party package or a package's
    # __init__ counts too. A __main__ runs its command when imported: left out.
    names = [name for name in modules(package) if not name.endswith(".__main__")]
    program = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in ('torch', 'ugro')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    free = dependency_free_common_modules()
    wrong = [
        name
        for name in loaded
        if within(name, "ugro")
        and name != "ugro"  # the namespace package
        and not within(name, package)
        and name not in free
    ]
    assert not wrong, f"importing {package} loaded {wrong}"
    if package == "ugro.exporter":
        assert not [name for name in loaded if within(name, "torch")]


def test_no_shipped_module_imports_a_main_module() -> None:
    wrong = [
        str(found)
        for package in PACKAGE_DIRS
        for found in all_imports(package)
        if found.target.split(".")[-1] == "__main__"
    ]
    assert not wrong, "move what is shared out of __main__ into a module:\n" + "\n".join(wrong)
