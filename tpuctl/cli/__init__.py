"""The tpuctl command line: `tpuctl COMMAND --help` for each command."""

import sys

# Each module registers its commands on `app` when imported. Keep these imports
# cheap: no jax, no google-cloud libraries at module level.
from tpuctl.cli import (
    babysit,  # noqa: F401
    config_cmd,  # noqa: F401
    export,  # noqa: F401
    jobs,  # noqa: F401
    lifecycle,  # noqa: F401
    top,  # noqa: F401
    workers,  # noqa: F401
)
from tpuctl.cli.app import app
from tpuctl.errors import TpuctlError


def main() -> None:
    """Run the CLI; a TpuctlError becomes one line on stderr, never a traceback.

    Usage errors, --help and Ctrl-C are left to typer's standalone mode.
    """
    try:
        app()
    except TpuctlError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
