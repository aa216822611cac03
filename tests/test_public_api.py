"""The public line: what ``import tensorlog`` offers, and what each layer lets the others import.

A subpackage's ``__all__`` lists exactly the names other packages import from it (or that ``tensorlog`` re-exports):
an export nobody uses is an internal leaking out, and an import from outside ``__all__`` is a layer reaching in.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import tomllib
from pathlib import Path

import pytest

import tensorlog

SRC = Path(tensorlog.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[tuple[str, str]]]:
    """For each imported module: ``(name, importer)`` for every ``from <module> import name`` in the package."""
    found: dict[str, set[tuple[str, str]]] = {}
    for path in SRC.rglob("*.py"):
        importer = _module_name(path)
        package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                found.setdefault(target, set()).add((alias.name, importer))
    return found


PACKAGES = sorted(_module_name(p) for p in SRC.rglob("__init__.py") if p.parent != SRC)


def test_the_public_names_resolve_and_say_what_they_are() -> None:
    for name in tensorlog.__all__:
        obj = getattr(tensorlog, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            own = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__  # not a base class's
            assert own, f"tensorlog.{name} has no docstring of its own"


def test_the_result_types_are_public() -> None:
    run_types = {"Run", "Step", "ModuleCall", "TensorRecord"}
    compare_types = {"Comparison", "ModuleResult", "TensorResult", "TensorMetrics", "ReplayResult"}
    assert run_types | compare_types <= set(tensorlog.__all__)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_exports_what_the_other_layers_use_and_nothing_more(package: str) -> None:
    module = importlib.import_module(package)
    used = {
        name
        for name, importer in _imports().get(package, set())
        if importer != package and not importer.startswith(package + ".")
    }
    used = {n for n in used if not inspect.ismodule(getattr(module, n, None))}  # a submodule is not an export
    entry_points = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]["entry-points"]
    named = {v.split(":")[1] for group in entry_points.values() for v in group.values() if v.split(":")[0] == package}
    exported = set(getattr(module, "__all__", ()))
    assert used <= exported, f"{package}: imported from outside but not in __all__: {sorted(used - exported)}"
    assert exported <= used | named, f"{package}: in __all__ but used by no other package: {sorted(exported - used - named)}"
