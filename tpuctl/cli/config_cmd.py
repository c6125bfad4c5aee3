"""`tpuctl config show`, `set` and `trust`: resolved settings and where they came from."""

from __future__ import annotations

import typer

from tpuctl import config
from tpuctl.cli.app import app
from tpuctl.cli.output import console, print_json

config_app = typer.Typer(
    help="Show resolved settings, set one in the user config file, or trust ./tpuctl.yaml.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print every resolved setting, its value and where it came from; the values of an
    untrusted ./tpuctl.yaml too, marked, so you can review them before trusting it."""
    settings = config.load(review=True)
    rows = settings.items()
    # Known keys that nothing sets are shown too, so users see what they could set.
    unset = [(key, None, "unset") for key in config.KNOWN_KEYS if settings.get(key) is None]
    if json_out:
        print_json({key: {"value": value, "source": source} for key, value, source in rows})
        return
    lines = [("KEY", "VALUE", "SOURCE")]
    for key, value, source in sorted([*rows, *unset]):
        shown = (
            "-"
            if value is None
            else ", ".join(map(str, value))
            if isinstance(value, list)
            else str(value)
        )
        lines.append((key, shown, source))
    key_width = max(len(k) for k, _, _ in lines)
    value_width = max(len(v) for _, v, _ in lines)
    for key, shown, source in lines:
        console.print(f"{key:<{key_width}}  {shown:<{value_width}}  {source}", markup=False)
    console.print(f"user file: {config.user_config_path()}")
    if settings.untrusted:
        console.print(f"note: {settings.untrusted}", markup=False)


@config_app.command("set")
def set_value(
    key: str = typer.Argument(..., help="Dotted key, e.g. zone or accelerators.v3-256.zone."),
    value: str = typer.Argument(..., help="Value; lists (zones) are comma-separated."),
) -> None:
    """Write KEY=VALUE into the user config file ($XDG_CONFIG_HOME/tpuctl/config.yaml)."""
    path, written = config.set_user_value(key, value)
    console.print(f"{key} = {written!r} written to {path}", markup=False)
    if var := config.env_override(key):
        console.print(f"note: {var} is set in this shell and overrides it here", markup=False)


@config_app.command("trust")
def trust() -> None:
    """Let ./tpuctl.yaml set keys that choose what runs on your workers, where your files
    and TPUs go, or how you log in (worker.*, bucket, project, ssh.key, ...). Trusts this
    content only: once the file changes, commands refuse it until you trust it again."""
    path, keys = config.trust_project_file()
    verb = "applies" if len(keys) == 1 else "apply"
    what = f"; its {', '.join(keys)} now {verb}" if keys else " (it sets no key that needs it)"
    console.print(f"trusted {path} as it is now{what}", markup=False)
