"""The package's layering (STYLE: pure tensor functions -> modules -> orchestration -> verbs ->
command line) holds: no module imports a layer above its own, and argparse stays in the CLI."""

import ast
from pathlib import Path

import pytest

import quept

SRC = Path(quept.__file__).parent

# what each part of the package may import from the rest of it (module-level or inside a
# function alike); the top-level quept/__init__.py re-exports the verbs and is not a layer
ALLOWED = {
    "ops": set(),
    "checks": set(),
    "config": {"checks", "ops"},
    "outputs": set(),
    "nn": {"checks", "config", "ops"},
    "models": {"checks", "config", "nn", "ops"},
    "data": {"checks", "config", "eval"},
    "eval": {"checks", "config", "data"},
    "calib": {"checks", "config", "eval", "models", "nn", "ops"},
    "search": {"calib", "checks", "config", "data", "models", "nn", "ops"},
    "export": {"calib", "checks", "config", "data", "models", "nn", "ops"},
    "api": {"calib", "checks", "config", "data", "eval", "export", "models", "nn", "ops",
            "outputs", "search", "version"},
    "info": {"api", "calib", "checks", "config", "export", "models", "nn", "ops", "search"},
    "cli": {"api", "calib", "checks", "config", "data", "eval", "export", "info", "models",
            "nn", "outputs", "search", "version"},
}


def _part(path: Path) -> str | None:
    parts = path.relative_to(SRC).with_suffix("").parts
    return None if parts == ("__init__",) else parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "quept":  # from quept import api, data / __version__
                found += [(node.lineno, "quept." + ("version" if a.name == "__version__"
                                                     else a.name)) for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


FILES = sorted(p for p in SRC.rglob("*.py") if _part(p) is not None)


def test_every_part_of_the_package_is_placed():
    assert {_part(p) for p in FILES} == set(ALLOWED)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_layer_above_its_own(path):
    part = _part(path)
    upward = [f"line {line}: {name}" for line, name in _imports(path)
              if name.startswith("quept.") and name.split(".")[1] not in ALLOWED[part] | {part}]
    assert not upward, f"{path.relative_to(SRC)} ({part}) imports {upward}"


@pytest.mark.parametrize("path", [p for p in FILES if _part(p) != "cli"],
                         ids=lambda p: str(p.relative_to(SRC)))
def test_argparse_stays_in_the_command_line(path):
    assert "argparse" not in {name for _, name in _imports(path)}, path
