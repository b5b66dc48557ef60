"""The ``homediff`` command. Thin: it parses arguments, calls the library and prints.

Each command group lives in its own module with a ``register(subparsers)`` function that adds its
sub-commands and sets ``run`` (a function of the parsed arguments returning an exit code).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from homediff import __version__
from homediff.app.cli import data as data_commands
from homediff.app.cli import demo as demo_commands
from homediff.app.cli import doctor as doctor_commands
from homediff.app.cli import eval as eval_commands
from homediff.app.cli import export as export_commands
from homediff.app.cli import generate as generate_commands
from homediff.app.cli import model as model_commands
from homediff.app.cli import plan as plan_commands
from homediff.app.cli import train as train_commands
from homediff.app.cli import ui as ui_commands
from homediff.errors import HomediffError

COMMAND_GROUPS = (demo_commands, data_commands, train_commands, plan_commands, generate_commands,
                  eval_commands, ui_commands, model_commands, export_commands, doctor_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homediff",
        description="Train a text-to-image diffusion model from scratch on hardware you own.")
    parser.add_argument("--version", action="version", version=f"homediff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show informational logs")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one-line message")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: with anything else running on the CPU,
    # spinning threads made training steps 6x slower here (set the variable to override).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args) or 0
    except (HomediffError, OSError, UnicodeError) as err:  # what a user can cause and fix
        if args.debug:
            raise
        print(f"homediff: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, HomediffError) else 1
    except KeyboardInterrupt as err:
        print(f"homediff: stopped{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130


def one_line(err: BaseException) -> str:
    """An error's message on one line, naming the file of an OSError."""
    if isinstance(err, OSError) and err.filename and not isinstance(err, HomediffError):
        return f"{err.filename}: {err.strerror or err}"
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
