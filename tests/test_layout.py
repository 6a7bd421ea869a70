"""The package's shape (docs/architecture.md): layers import downward only, at any depth of a module (also
inside functions), module paths are file paths, and tests/benchmarks are not part of the package."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# layer -> the sagrt subpackages it may import (itself and those below it)
LAYERS = {
    "sagrt": set(),
    "export": {"export"},
    "engine": {"export", "engine"},
    "runtime": {"export", "engine", "runtime"},
    "bench": {"export", "engine", "runtime", "bench"},
    "serve": {"export", "engine", "runtime", "serve"},
}
CORE_MODULES = {"sagrt"} | {f"sagrt.{path.stem}" for path in (ROOT / "sagrt").glob("*.py")}


def sagrt_imports(path: Path) -> set[str]:
    """Every sagrt module a file imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sagrt":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "sagrt")
    return found


def layer_files():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            yield layer, path


@pytest.mark.parametrize("layer,path", list(layer_files()), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(
    v, Path) else v)
def test_layers_import_downward_only(layer, path):
    for module in sagrt_imports(path):
        parts = module.split(".")
        if module in CORE_MODULES:
            continue
        assert len(parts) > 1 and parts[1] in LAYERS[layer], f"{path.relative_to(ROOT)} imports {module}"


def test_module_paths_are_file_paths():
    for package, folder in (("sagrt.export", "export"), ("sagrt.engine", "engine"), ("sagrt.runtime", "runtime"),
                            ("sagrt.runtime.commands", "runtime/commands"), ("sagrt.bench", "bench"),
                            ("sagrt.serve", "serve")):
        assert Path(importlib.import_module(package).__file__).parent == ROOT / folder


def test_tests_and_benchmarks_are_not_sagrt_modules():
    import sagrt

    assert list(sagrt.__path__) == [str(ROOT / "sagrt")]
    for name in ("sagrt.tests", "sagrt.benchmarks"):
        assert importlib.util.find_spec(name) is None
