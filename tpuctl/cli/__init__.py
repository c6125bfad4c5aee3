"""The tpuctl command line: `tpuctl COMMAND --help` for each command."""

import atexit
import contextlib
import importlib
import os
import sys
import threading
from typing import NoReturn

import typer

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
    """Run the CLI; a TpuctlError, and a usage error (an unknown option, a flag's value of
    the wrong type, a missing argument), become one line on stderr, never a traceback."""
    load_commands(sys.argv[1:])
    try:
        status = app(prog_name="tpuctl", standalone_mode=False)  # --help, Exit, Ctrl-C: a status
    except TpuctlError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as err:  # the errors of the click typer vendors
        _show_click_error(err)
        sys.exit(err.exit_code)
    sys.exit(status if isinstance(status, int) else 0)


def _show_click_error(err: typer.TyperException) -> None:
    """A usage error as one line naming the flag, with where to read the usage: click's own
    display is the command's usage, a hint and the error, on four lines."""
    if type(err).__name__ == "NoArgsIsHelpError":  # a group given no command: its help
        err.show()
        return
    message = " ".join(err.format_message().split()).removesuffix(".")
    context = getattr(err, "ctx", None)
    usage = f" (usage: `{context.command_path} -h`)" if context is not None else ""
    print(f"error: {message[:1].lower()}{message[1:]}{usage}", file=sys.stderr)


def entry() -> NoReturn:
    """The `tpuctl` executable (and `python -m tpuctl`): `main`, then out of the process
    without tearing the interpreter down.

    Freeing every module's objects at exit took about 14 ms of every command, a sixth of a
    warm `tpuctl exec`. What exit still owes is done here: other threads still running are
    waited for (then the interpreter exits as usual), atexit handlers run and the standard
    streams are flushed. A crash (any other exception) exits as usual, with its traceback.
    """
    try:
        main()
        status = 0
    except SystemExit as exit_:
        status = _exit_status(exit_.code)
    if any(t is not threading.current_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(status)
    atexit._run_exitfuncs()  # what sys.exit would run; os._exit runs nothing
    for stream in (sys.stdout, sys.stderr):
        # a reader that went away (`tpuctl ps | head -1`) or a closed stream
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` gives: None is 0, an int itself, anything else printed
    to stderr and 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1
