"""The tpuctl command line: `tpuctl COMMAND --help` for each command."""

import sys

from tpuctl.cli.app import app
from tpuctl.errors import TpuctlError

# Each module registers its commands on `app` when imported. Keep these imports
# cheap: no jax, no google-cloud libraries at module level.


def main() -> None:
    """Run the CLI; a TpuctlError becomes one line on stderr, never a traceback."""
    try:
        rc = app(standalone_mode=False)
    except TpuctlError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click's usage errors arrive here in non-standalone mode
        _exit_for_click_error(err)
    sys.exit(rc if isinstance(rc, int) else 0)


def _exit_for_click_error(err: Exception) -> None:
    import click

    if isinstance(err, click.exceptions.Abort):
        print("aborted", file=sys.stderr)
        sys.exit(1)
    if isinstance(err, click.ClickException):
        err.show()
        sys.exit(err.exit_code)
    raise err
