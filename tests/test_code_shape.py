"""The shape the code keeps: functions short enough to read on one screen, and command-line parsing
only in the command-line layer."""

import ast
from pathlib import Path

import homediff

PACKAGE = Path(homediff.__file__).parent
LONGEST = 60  # lines of a function, its docstring included


def parsed():
    return {path: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in parsed().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST]
    assert not long, long


def test_only_the_command_line_layer_imports_argparse():
    cli = PACKAGE / "app" / "cli"
    importing = [str(path.relative_to(PACKAGE)) for path, tree in parsed().items()
                 if cli not in path.parents and any(
                     isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names)
                     or isinstance(node, ast.ImportFrom) and node.module == "argparse"
                     for node in ast.walk(tree))]
    assert not importing, importing
