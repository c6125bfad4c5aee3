"""`tpuctl prepare`, `run`, `logs`, `ps` and `kill`: training jobs on every worker of a node.

Thin layer: resolve the node and its hosts, call tpuctl.jobs, render the result.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tpuctl import config
from tpuctl.cli.app import app
from tpuctl.cli.options import (
    NODE_ARGUMENT,
    NODE_NAME_OPTION,
    chosen_node,
    parse_env_flags,
    seconds,
)
from tpuctl.cli.output import err_console, format_duration
from tpuctl.errors import TpuctlError
from tpuctl.wording import plural

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.fanout import Host, HostResult
    from tpuctl.providers.base import Node

WORKER_OPTION = typer.Option(None, "--worker", "-w", help="Workers, e.g. 0,3,5-7 (default: all).")


def _run_id(value: str | None) -> str | None:
    from tpuctl.naming import validate_run_id

    return None if value is None else validate_run_id(value)


RUN_ID_OPTION = typer.Option(
    None, "--run-id", help="Run id (default: the node's latest run).", callback=_run_id
)


def _target(
    name: str | None, worker: str | None = None, fresh: bool = False
) -> tuple[Settings, Node, list[Host]]:
    """The node and its hosts; `fresh` asks the provider rather than the address cache."""
    from tpuctl.hosts import hosts_for, lookup_node, parse_workers

    settings = config.load()
    node = lookup_node(settings, name, use_cache=not fresh)
    if not node.ready:
        raise TpuctlError(
            f"node {node.name} is {node.state}, not READY; see `tpuctl status {node.name}`", 1
        )
    from tpuctl.fanout.holder import attach_node

    workers = parse_workers(worker, len(node.workers))
    hosts = hosts_for(settings, node, workers)
    attach_node(settings, node, hosts if workers is None else hosts_for(settings, node))
    return settings, node, hosts


def _print_line(host: Host, _stream: str, line: str) -> None:
    sys.stdout.write(f"{host.label} | {line}\n")
    sys.stdout.flush()


def _follow(
    hosts: list[Host], run_id: str | None, lines: int | None, all_lines: bool, raw: bool = False
) -> None:
    """Stream logs until the job exits everywhere; Ctrl-C stops following, not the job."""
    from tpuctl import jobs
    from tpuctl.fanout import Interrupted

    try:
        results = jobs.logs(
            hosts,
            run_id=run_id,
            lines=lines,
            follow=True,
            all_lines=all_lines,
            raw=raw,
            on_line=_print_line,
        )
    except Interrupted:
        err_console.print(
            "stopped following; the job keeps running (`tpuctl logs --tail` to follow again, "
            "`tpuctl kill` to stop it)"
        )
        raise typer.Exit(130) from None
    _report_missing_logs(results, run_id)


@app.command()
def prepare(
    name: str | None = NODE_ARGUMENT,
    name_option: str | None = NODE_NAME_OPTION,
) -> None:
    """Prepare every worker to run the trainer, as `run` would first: a Python that fits
    (uv installs one where the worker's python3 is too old), a venv with the trainer and
    jax. Workers already prepared with the same source and settings are skipped."""
    name = chosen_node(name, name_option)
    from tpuctl.jobs.runs import prepare_workers

    settings, node, hosts = _target(name, fresh=True)
    prepare_workers(settings, node, hosts, lambda m: err_console.print(m, markup=False))
    print(f"{node.name}: {plural(len(hosts), 'worker')} ready")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def run(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe: a local YAML file or a gs:// URI."),
    name: str | None = typer.Option(None, "--name", "-n", help="Node (default: config `node`)."),
    all_workers: bool = typer.Option(
        False, "--all-workers", help="Run on every worker (needed on multi-host nodes)."
    ),
    env: list[str] = typer.Option(
        [], "--env", "-e", help="K=V, or K to pass your local value (repeatable); kept secret."
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream the logs after launch."),
    run_id: str | None = typer.Option(None, "--run-id", help="Run id (default: RECIPE-TIME)."),
    force: bool = typer.Option(False, "--force", help="Stop a running job first."),
) -> None:
    """Train RECIPE on the node: validate it here, store it in GCS, prepare the workers and
    start the trainer detached on each. Recipe overrides go after `--` (train.steps=20)."""
    from tpuctl.fanout import Interrupted
    from tpuctl.jobs.runs import RunRequest, final_summary, start_run
    from tpuctl.naming import validate_run_id

    if run_id is not None:
        validate_run_id(run_id)
    # Fresh addresses: a launch must not go to a recreated node's old ones.
    settings, node, hosts = _target(name, fresh=True)
    if len(hosts) > 1 and not all_workers:
        raise TpuctlError(
            f"{node.name} has {len(hosts)} workers and the trainer must run on all of them: "
            "add --all-workers"
        )
    request = RunRequest(recipe, list(ctx.args), parse_env_flags(env), run_id, force)
    try:
        started = start_run(
            settings, node, hosts, request, lambda m: err_console.print(m, markup=False)
        )
    except Interrupted:  # on the workers, before or while launching: nothing of it runs
        named = f"run {run_id}" if run_id else "the run"
        raise TpuctlError(
            f"interrupted before {named} started on every worker; it runs on none of them "
            "(`tpuctl ps` shows what does)",
            130,
        ) from None
    print(f"run {started.run_id} started on {plural(len(hosts), 'worker')} of {node.name}")
    print(f"  recipe:      {started.recipe_uri}")
    home = "the worker's directory" if node.provider == "local" else "~"
    print(f"  logs:        {started.worker_log} in {home}, on each worker (`tpuctl logs --tail`)")
    print(f"  checkpoints: {started.run_dir.rstrip('/')}/checkpoints")
    sys.stdout.flush()
    if not follow:
        return
    _follow(hosts, started.run_id, None, all_lines=False)
    summary = final_summary(started.run_dir, node, hosts)
    _report_end(hosts, started.run_id, summary, started.run_dir)


def _report_end(hosts: list[Host], run_id: str, summary: dict | None, run_dir: str) -> None:
    from tpuctl import jobs
    from trainer.contract import EXIT_PREEMPTED  # the trainer's, after a SIGTERM

    final = jobs.status(hosts, run_id)
    failed = [j for j in final if j.exit_code != 0]
    if failed and all(j.exit_code == EXIT_PREEMPTED for j in failed):
        labels = ", ".join(j.label for j in failed)
        raise TpuctlError(
            f"run {run_id} stopped on SIGTERM (`tpuctl kill`, or a preemption) with its steps "
            f"saved: exit {EXIT_PREEMPTED} on {labels}; run it again with the same run_dir to resume",
            1,
        )
    if failed:
        details = ", ".join(f"{j.label} exit {j.exit_code}" for j in failed)
        raise TpuctlError(f"run {run_id} failed: {details}; see `tpuctl logs --all-lines`", 1)
    if summary is None:
        print(f"run {run_id} exited 0 on every worker but wrote no DONE record in {run_dir}")
        return
    loss = summary.get("final", {}).get("loss")
    loss_text = f"final loss {loss:.4f}" if isinstance(loss, int | float) else "no loss logged"
    print(f"run {run_id} finished: step {summary.get('step')}, {loss_text}")
    print(f"checkpoints: {run_dir.rstrip('/')}/checkpoints")


@app.command()
def logs(
    name: str | None = NODE_ARGUMENT,
    name_option: str | None = NODE_NAME_OPTION,
    tail: bool = typer.Option(False, "--tail", "-f", help="Follow until the job exits."),
    lines: int | None = typer.Option(
        None, "-n", "--lines", help="Lines of history (default: all; 20 with --tail)."
    ),
    worker: str | None = WORKER_OPTION,
    run_id: str | None = RUN_ID_OPTION,
    all_lines: bool = typer.Option(
        False, "--all-lines", help="Every line of every worker (default: worker 0, and errors)."
    ),
    raw: bool = typer.Option(
        False, "--raw", help="Keep runtime chatter (gloo connections, XLA INFO lines) too."
    ),
) -> None:
    """Show the run's log: worker 0 in full plus error lines from the others, without
    runtime chatter (`--raw` keeps it)."""
    name = chosen_node(name, name_option)
    from tpuctl import jobs

    _settings, _node, hosts = _target(name, worker)
    if lines is not None and lines < 0:
        raise TpuctlError(f"-n {lines}: give a number of lines, 0 or more")
    if tail:
        _follow(hosts, run_id, 20 if lines is None else lines, all_lines, raw)
        return
    results = jobs.logs(
        hosts, run_id=run_id, lines=lines, all_lines=all_lines, raw=raw, on_line=_print_line
    )
    _report_missing_logs(results, run_id)


def _report_missing_logs(results: list[HostResult], run_id: str | None) -> None:
    """One line for the workers that have no such run (an error when none has it), and an
    error naming the workers whose log could not be read."""
    from tpuctl import jobs

    run = f"run{f' {run_id}' if run_id else ''}"
    missing = [r.host.label for r in results if r.exit_code == jobs.NO_RUN_EXIT]
    if results and len(missing) == len(results):
        raise TpuctlError(f"no {run} on these workers", 1)
    if missing:
        err_console.print(f"no {run} on {', '.join(missing)}", markup=False)
    unreachable = [r for r in results if not r.ok and r.exit_code != jobs.NO_RUN_EXIT]
    if unreachable:
        details = "; ".join(f"{r.host.label}: {r.error or r.stderr.strip()}" for r in unreachable)
        raise TpuctlError(
            f"could not read the log on {plural(len(unreachable), 'worker')}: {details}", 1
        )


@app.command()
def ps(
    name: str | None = NODE_ARGUMENT,
    name_option: str | None = NODE_NAME_OPTION,
    run_id: str | None = RUN_ID_OPTION,
) -> None:
    """Per worker: the run, its state (running / exited with code / absent), uptime, and
    the newest log line that is not runtime chatter."""
    name = chosen_node(name, name_option)
    from tpuctl import jobs

    _settings, _node, hosts = _target(name)
    rows = [("WORKER", "RUN", "STATE", "UPTIME", "LAST LINE")]
    for job in jobs.status(hosts, run_id):
        state = job.state
        if job.state == "exited":
            state = f"exited {job.exit_code if job.exit_code is not None else '?'}"
        elif job.error:
            state = f"unreachable: {job.error}"
        uptime = format_duration(job.uptime) if job.uptime is not None else "-"
        rows.append((job.label, job.run_id or "-", state, uptime, job.last_line[:100]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[4]
        )


@app.command()
def kill(
    name: str | None = NODE_ARGUMENT,
    name_option: str | None = NODE_NAME_OPTION,
    grace: float = typer.Option(
        30.0,
        "--grace",
        help="Seconds between SIGTERM and SIGKILL.",
        callback=seconds("--grace", allow_zero=True),
    ),
    force: bool = typer.Option(
        False, "--force", help="Also kill other processes holding the TPU devices."
    ),
) -> None:
    """Stop the job on every worker: SIGTERM (the trainer saves), SIGKILL after --grace,
    then clear lockfiles. Nothing running is not an error."""
    name = chosen_node(name, name_option)
    from tpuctl import jobs

    _settings, _node, hosts = _target(name)
    failed = 0
    for report in jobs.kill(hosts, grace=grace, force=force):
        if report.error:
            failed += 1
            print(f"{report.label}: failed: {report.error}")
            continue
        what = f"stopped {report.run_id} ({report.signal})" if report.run_id else "nothing running"
        holders = "".join(f"; killed {h}" for h in report.holders)
        print(f"{report.label}: {what}{holders}")
    if failed:
        raise TpuctlError(f"kill failed on {plural(failed, 'worker')}", 1)


@app.command()
def profile(
    run: str = typer.Argument(
        ..., help="A run directory (local or gs://), or a node: its latest run from here."
    ),
    to: Path | None = typer.Option(
        None, "--to", help="Where to put the trace (default: ./RUN_NAME-profile)."
    ),
) -> None:
    """Fetch the jax.profiler trace a run wrote for `train.profile_steps` ({run_dir}/profile,
    TensorBoard / XProf format) and say how to open it."""
    from tpuctl import storage
    from tpuctl.jobs.runs import fetch_profile, find_run

    run_dir, emulator = find_run(run)
    destination = to or Path(f"{run_dir.rstrip('/').rsplit('/', 1)[-1]}-profile")
    with storage.emulated(emulator):
        traces = fetch_profile(run_dir, destination)
    print(f"{len(traces)} trace(s) of {run_dir} in {destination}: {traces[-1]}")
    print(
        f"open it: tensorboard --logdir {destination} (the Profile tab), or xprof --logdir {destination}"
    )
