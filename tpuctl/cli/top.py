"""`tpuctl top`: one live screen of your nodes and the runs on them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from tpuctl import config
from tpuctl.cli.app import app
from tpuctl.cli.output import console, print_json, print_table
from tpuctl.durations import Clock, format_duration, parse_duration
from tpuctl.wording import plural

if TYPE_CHECKING:
    from rich.table import Table

COLUMNS = (
    "NODE", "ZONE", "TYPE", "STATE", "AGE", "SCHED", "RUN", "STEP", "LOSS", "TOK/S", "MFU",
    "ETA", "RESTARTS", "BABYSITTER",
)  # fmt: skip


@app.command()
def top(
    interval: str = typer.Option("5s", "--interval", help="Time between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one snapshot and exit."),
    json_out: bool = typer.Option(False, "--json", help="With --once: JSON (see the README)."),
) -> None:
    """Every node in the configured zones and every local pod, with the latest run on each:
    step / total, loss, tokens/s, MFU, ETA, restarts and its babysitter. Ctrl-C quits."""
    from tpuctl import top as snapshot

    settings = config.load()
    every = parse_duration(interval, "--interval")
    if once or json_out:
        rows = [snapshot.row_json(r, datetime.now(UTC)) for r in snapshot.collect(settings)]
        if json_out:
            print_json({"nodes": rows})
        else:
            print_table(_table(rows))
        return
    from rich.live import Live

    clock = Clock()
    with Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                rows = [snapshot.row_json(r, datetime.now(UTC)) for r in snapshot.collect(settings)]
                live.update(_table(rows), refresh=True)
                clock.sleep(every)
        except KeyboardInterrupt:
            return


def _table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold", caption=plural(len(rows), "node"))
    for column in COLUMNS:
        table.add_column(column, no_wrap=True)
    for row in rows:
        run = row["run"] or {}
        table.add_row(
            row["name"],
            row["zone"],
            row["accelerator_type"],
            row["state"],
            format_duration(row["age_s"]) if row["age_s"] is not None else "-",
            row["scheduling"],
            run.get("run_id") or "-",
            _steps(run),
            _number(run.get("loss"), "{:.4f}"),
            _number(run.get("tokens_per_s"), "{:.0f}"),
            _number(run.get("mfu"), "{:.1%}"),
            format_duration(run["eta_s"]) if run.get("eta_s") is not None else "-",
            _number(run.get("restarts"), "{}"),
            run.get("babysitter") or "-",
        )
    return table


def _steps(run: dict[str, Any]) -> str:
    if run.get("step") is None:
        return "-"
    total = run.get("total_steps")
    return f"{run['step']}/{total}" if total is not None else str(run["step"])


def _number(value: Any, pattern: str) -> str:
    return pattern.format(value) if isinstance(value, int | float) else "-"
