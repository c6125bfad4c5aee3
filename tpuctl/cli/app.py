"""The typer application every command module registers on.

Command modules stay thin: they parse flags, call a plain module (providers, fanout,
jobs, babysit) and render its result. Heavy libraries are imported inside commands.
"""

import typer

app = typer.Typer(
    name="tpuctl",
    help="Create, drive and babysit Cloud TPU pods, and train JAX models on them.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from tpuctl import __version__

        print(f"tpuctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Create, drive and babysit Cloud TPU pods, and train JAX models on them."""
