"""The tpuctl command line: `tpuctl COMMAND --help` for each command."""

import importlib
import sys

from tpuctl.cli.app import app
from tpuctl.errors import TpuctlError

# The module that registers each command. A command loads only its own module, so typer
# builds one command's parameters instead of all of them and `tpuctl exec` does not
# import what `up` or `babysit` need (~0.1 s of every command's start-up); anything
# else (`--help`, an unknown or misspelt name) loads them all. tests/test_cli.py checks
# this table against what the modules register.
COMMAND_MODULES = {
    "babysit": "babysit",
    "config": "config_cmd",
    "export": "export",
    "prepare": "jobs",
    "run": "jobs",
    "logs": "jobs",
    "ps": "jobs",
    "kill": "jobs",
    "profile": "jobs",
    "up": "lifecycle",
    "down": "lifecycle",
    "list": "lifecycle",
    "status": "lifecycle",
    "types": "lifecycle",
    "top": "top",
    "exec": "workers",
    "ssh": "workers",
    "put": "workers",
    "get": "workers",
    "clear-locks": "workers",
    "check": "workers",
}


def load_commands(argv: list[str]) -> None:
    """Register the command `argv` names, or every command when it names none.

    Keep the command modules cheap to import: no jax, no google-cloud libraries at
    module level."""
    named = COMMAND_MODULES.get(argv[0]) if argv else None
    for module in [named] if named else sorted(set(COMMAND_MODULES.values())):
        importlib.import_module(f"tpuctl.cli.{module}")


def main() -> None:
    """Run the CLI; a TpuctlError becomes one line on stderr, never a traceback.

    Usage errors, --help and Ctrl-C are left to typer's standalone mode.
    """
    load_commands(sys.argv[1:])
    try:
        app()
    except TpuctlError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
