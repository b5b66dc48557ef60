"""The package's layers, lowest first: a module imports only from lower layers and its own unit.

Checked twice: statically, over every import statement of every module (those inside functions
too), and in a fresh interpreter per unit, which must load no unit above it.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import homediff

PACKAGE = Path(homediff.__file__).parent
LAYERS = [
    ["errors", "atomic"],
    ["caching"],
    ["precision", "geometry", "figures", "exports", "extras", "hub"],
    ["data", "models", "diffusion", "encoders"],
    ["datasets", "hdm_release"],
    ["pipeline", "generation"],
    ["training", "evaluation", "diffusers_pipeline"],
    ["planning"],
    ["app"],
]
LAYER = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
    """The unit (top-level module or subpackage of homediff) a dotted module name belongs to."""
    parts = module.split(".")
    return parts[1] if parts[0] == "homediff" and len(parts) > 1 else None


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: Path, name: str) -> set[str]:
    """Every homediff module named by an import statement of a module (relative ones resolved)."""
    names = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.startswith("homediff.")}


def test_every_unit_has_a_layer():
    units = {unit_of(name) for name in modules()} - {None, "__main__"}
    assert units == set(LAYER), "add the new module to LAYERS"


def test_no_module_imports_from_a_layer_above_or_beside_it():
    wrong = []
    for name, path in modules().items():
        own = unit_of(name)
        if own in (None, "__main__"):
            continue
        for target in imported(path, name):
            other = unit_of(target)
            if other in LAYER and other != own and LAYER[other] >= LAYER[own]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("unit", [u for units in LAYERS for u in units])
def test_a_unit_loads_no_unit_above_it_in_a_fresh_interpreter(unit):
    names = [name for name in modules() if unit_of(name) == unit]
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    above = sorted({unit_of(m) for m in loaded} & {u for u in LAYER if LAYER[u] > LAYER[unit]})
    assert not above, f"importing homediff.{unit} loads {above}"


def test_reading_a_config_loads_neither_torch_nor_pillow():
    recipe = PACKAGE / "recipes" / "hdm-xut-base.toml"
    code = ("import json, sys\nfrom homediff.training.config import load_config\n"
            f"load_config({str(recipe)!r})\nprint(json.dumps(sorted(sys.modules)))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout))
    assert not loaded & {"torch", "PIL", "numpy"}
