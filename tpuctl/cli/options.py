"""Flag parsing shared by several commands."""

import os
import re
from collections.abc import Callable

import typer

from tpuctl.errors import TpuctlError

NODE_ARGUMENT = typer.Argument(
    None, help="Node name (default: config `node`, or the only node).", show_default=False
)
# `run`, `babysit`, `up`, `put` and `get` take the node as --name (their arguments are
# other things), so every command that takes NAME takes --name too: the flag a user just
# typed for `run` works for the `logs` that follows.
NODE_NAME_OPTION = typer.Option(None, "--name", help="The node, as NAME.", show_default=False)


def chosen_node(argument: str | None, option: str | None) -> str | None:
    """The node a command was given, as NAME or as --name; both, naming two nodes, is a
    usage error."""
    if argument and option and argument != option:
        raise TpuctlError(f"NAME {argument} and --name {option} are two nodes: give the node once")
    return argument or option


def parse_env_flags(pairs: list[str]) -> dict[str, str]:
    """`--env K=V`, or a bare `--env K` taking the local value of K (keeps it out of argv)."""
    from tpuctl.fanout.base import ENV_NAME, env_problem

    env: dict[str, str] = {}
    for pair in pairs:
        name, has_value, value = pair.partition("=")
        if not ENV_NAME.match(name):
            # Only up to the first character no name has: NAME:VALUE must not echo VALUE.
            shown = re.match(r"[A-Za-z0-9_]*", name)[0]
            raise TpuctlError(
                f"--env {shown + '...' if shown != name else name!r}: a name is letters, "
                "digits and _ (not first a digit); use --env NAME=VALUE or --env NAME"
            )
        if not has_value:
            if name not in os.environ:
                raise TpuctlError(f"--env {name}: {name} is not set in your environment")
            value = os.environ[name]
        if problem := env_problem(name, value):
            raise TpuctlError(f"--env {name}: {problem}")
        env[name] = value
    return env


def seconds(flag: str, allow_zero: bool = False) -> Callable[[float | None], float | None]:
    """A typer callback refusing a negative, zero (unless `allow_zero`) or non-finite
    number of seconds for `flag` with a one-line error; None (not given) passes."""
    from tpuctl.durations import check_seconds

    def check(value: float | None) -> float | None:
        return None if value is None else check_seconds(value, flag, allow_zero)

    return check
