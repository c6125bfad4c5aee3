"""`tpuctl babysit`: keep a run alive until it finishes (the loop is tpuctl.babysit)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tpuctl import config
from tpuctl.cli.app import app
from tpuctl.cli.options import parse_env_flags, seconds
from tpuctl.cli.output import err_console
from tpuctl.durations import format_duration, parse_duration
from tpuctl.errors import TpuctlError

if TYPE_CHECKING:
    from rich.table import Table

    from tpuctl.babysit import BabysitState, Babysitter, View


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def babysit(
    ctx: typer.Context,
    accelerator_type: str | None = typer.Argument(
        None, help="TPU type, e.g. v4-32 (default: the node's, for the spelling without RECIPE)."
    ),
    recipe: str | None = typer.Argument(
        None, help="Recipe file or gs:// URI (default: the last run on the node)."
    ),
    name: str | None = typer.Option(None, "--name", "-n", help="Node (default: config `node`)."),
    preemptible: bool = typer.Option(False, "--preemptible", help="Recreate as preemptible."),
    spot: bool = typer.Option(False, "--spot", help="Recreate as spot."),
    run_id: str | None = typer.Option(
        None, "--run-id", help="Run id (default: RECIPE-TIME; give it to carry on a run)."
    ),
    env: list[str] = typer.Option(
        [], "--env", "-e", help="K=V, or K to pass your local value (repeatable); kept secret."
    ),
    max_preemptions: int | None = typer.Option(
        None, "--max-preemptions", help="Give up after this many preemptions (default: never)."
    ),
    max_failures: int = typer.Option(
        3, "--max-failures", help="Give up after this many job failures (crash, hang)."
    ),
    max_restarts: int | None = typer.Option(
        None, "--max-restarts", help="Give up after this many restarts of any kind."
    ),
    poll: str = typer.Option("30s", "--poll", help="How often to look at the node and job."),
    not_ready_grace: str = typer.Option(
        "5m", "--not-ready-grace", help="A node neither READY nor gone this long is replaced."
    ),
    hang_timeout: str = typer.Option(
        "30m", "--hang-timeout", help="No new step for this long counts as a failure."
    ),
    stop_grace: float = typer.Option(
        30.0,
        "--grace",
        help="Seconds between SIGTERM and SIGKILL when stopping a job.",
        callback=seconds("--grace", allow_zero=True),
    ),
    retry_for: str = typer.Option(
        "24h", "--retry-for", help="Keep retrying stockouts this long when recreating."
    ),
    delete_when_done: bool = typer.Option(
        False, "--delete-when-done", help="Delete the node once the run is finished."
    ),
    adopt: bool = typer.Option(
        False,
        "--adopt",
        help="Hand the node over: babysit may replace it though it was not created for the run.",
    ),
    log_file: Path | None = typer.Option(
        None, "--log-file", help="Babysitter log (default: STATE_DIR/tpuctl/babysit/RUN.log)."
    ),
) -> None:
    """Keep RECIPE running on node --name until its DONE marker exists: recreate the node
    after preemptions (and stockouts), relaunch after crashes and hangs, resume from the
    newest checkpoint each time. Recipe overrides go after `--` (train.steps=20)."""
    from tpuctl.babysit import BabysitOptions, Babysitter, last_run, stop_on_signals
    from tpuctl.naming import validate_run_id

    if spot and preemptible:
        raise TpuctlError("--spot and --preemptible exclude each other; pick one")
    if run_id is not None:
        validate_run_id(run_id)
    if accelerator_type is not None:
        _check_accelerator_type(accelerator_type, recipe)
    settings = config.load()
    node_name = name or settings.get("node")
    if recipe is None:
        accelerator_type, node_name, run_id, recipe = last_run(settings, node_name, run_id)
    if not node_name:
        raise TpuctlError("babysit needs a node name: pass --name NAME (it is created if missing)")
    from tpuctl.providers import point_at_registered

    point_at_registered(settings, node_name)  # a local pod, or a cloud node in another zone
    options = BabysitOptions(
        accelerator_type=str(accelerator_type),
        node=node_name,
        recipe=recipe,
        overrides=list(ctx.args),
        env=parse_env_flags(env),
        run_id=run_id,
        user=config.local_user(),
        adopt=adopt,
        scheduling="spot" if spot else "preemptible" if preemptible else "on-demand",
        max_preemptions=max_preemptions,
        max_failures=max_failures,
        max_restarts=max_restarts,
        poll_s=parse_duration(poll, "--poll"),
        not_ready_grace_s=parse_duration(not_ready_grace, "--not-ready-grace"),
        hang_timeout_s=parse_duration(hang_timeout, "--hang-timeout"),
        stop_grace_s=stop_grace,
        retry_for_s=parse_duration(retry_for, "--retry-for", allow_zero=True),
        delete_when_done=delete_when_done,
    )
    sitter = Babysitter(settings, options)
    try:
        with stop_on_signals(sitter.stopping):
            state = babysit_with_display(sitter, node_name, log_file)
    except KeyboardInterrupt:
        print(
            f"babysit: interrupted; node {node_name} and run {sitter.run_id} are left as they "
            f"are (start babysit again with --run-id {sitter.run_id} to carry on)",
            file=sys.stderr,
        )
        raise typer.Exit(130) from None
    loss = state.final_loss
    loss_text = f"final loss {loss:.4f}" if isinstance(loss, int | float) else "no loss logged"
    print(f"run {state.run_id} finished: step {state.final_step}, {loss_text}")
    print(
        f"restarts: {state.preemptions} preemption(s), {state.failures} failure(s), "
        f"{state.launches} launch(es)"
    )


def _check_accelerator_type(text: str, recipe: str | None) -> None:
    """A first argument that is no TPU type is most often a node name (as `exec NODE`
    takes one): say where the node goes rather than failing on something else later."""
    from tpuctl import catalog

    try:
        catalog.parse(text)
    except TpuctlError:
        if recipe is not None:
            raise
        raise TpuctlError(
            f"{text!r} is not a TPU type (e.g. v4-32); the node goes in --name: "
            f"`tpuctl babysit --name {text}` carries on its latest run"
        ) from None


def babysit_with_display(sitter: Babysitter, node_name: str, log_file: Path | None):
    """Claim the run, then babysit it with the live table (or log lines) until DONE."""
    from tpuctl.babysit import LogFile

    display = Display()
    sitter.claim()  # a second babysitter, or a run_dir it would lose, stops here: one line
    with LogFile(sitter.run_id, log_file) as write_log:

        def log(line: str) -> None:
            write_log(line)
            display.note(line)

        sitter.log, sitter.on_update = log, display.refresh
        err_console.print(f"babysitting run {sitter.run_id} on {node_name}; log: {write_log.path}")
        try:
            with display:
                return sitter.run()
        except KeyboardInterrupt:
            write_log(f"interrupted: stopped babysitting run {sitter.run_id}")
            raise


class Display:
    """A live table on a terminal; elsewhere (nohup, pipes) one timestamped line per event."""

    def __init__(self) -> None:
        self.live = None
        self.recent: list[str] = []
        self.snapshot: tuple[BabysitState, View] | None = None

    def __enter__(self) -> Display:
        if err_console.is_terminal:
            from rich.live import Live

            self.live = Live(console=err_console, refresh_per_second=2, transient=False)
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()

    def note(self, line: str) -> None:
        self.recent = [*self.recent, f"{time.strftime('%H:%M:%S')} {line}"][-8:]
        if self.live is None:
            print(self.recent[-1], file=sys.stderr, flush=True)
        else:
            self.live.update(self._table())

    def refresh(self, state: BabysitState, view: View) -> None:
        self.snapshot = (state, view)
        if self.live is not None:
            self.live.update(self._table())

    def _table(self) -> Table:
        from rich.markup import escape
        from rich.table import Table

        table = Table(show_header=False, box=None)
        if self.snapshot is not None:
            state, view = self.snapshot
            loss = f"{view.loss:.4f}" if isinstance(view.loss, int | float) else "-"
            table.add_row("run", escape(f"{state.run_id} on {state.node} ({view.node_state})"))
            table.add_row("now", escape(view.activity))
            table.add_row("step", f"{view.step if view.step is not None else '-'}  loss {loss}")
            workers = "  ".join(f"{w.label}:{w.state}" for w in view.workers) or "-"
            table.add_row("workers", workers)
            table.add_row(
                "restarts", f"{state.preemptions} preemption(s), {state.failures} failure(s)"
            )
            for event in state.events[-5:]:
                lost = format_duration(event.resumed_s) if event.resumed_s else "…"
                text = f"{event.kind} at step {event.step}: {event.cause} (lost {lost})"
                table.add_row("", escape(text))
        for line in self.recent:
            table.add_row("", f"[dim]{escape(line)}[/dim]")
        return table
