"""`tpuctl exec`, `ssh`, `put`, `get`, `clear-locks` and `check`: every worker at once.

Thin layer: resolve the node (from the address cache when possible), build hosts
(tpuctl.hosts), fan out (tpuctl.fanout), render (tpuctl.fanout.report).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperCommand

from tpuctl import config
from tpuctl.cli.app import app
from tpuctl.cli.options import (
    NODE_ARGUMENT,
    NODE_NAME_OPTION,
    chosen_node,
    parse_env_flags,
    seconds,
)
from tpuctl.errors import TpuctlError

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.fanout import Host, HostResult
    from tpuctl.providers.base import Node

NAME_OPTION = typer.Option(None, "--name", "-n", help="Node name (default: config `node`).")
WORKER_OPTION = typer.Option(
    None, "--worker", "-w", help="Workers to use, e.g. 0,3,5-7 (default: all)."
)
ALL_WORKERS_OPTION = typer.Option(False, "--all-workers", help="Every worker (the default).")
ZONE_OPTION = typer.Option(None, "--zone", "-z", help="Zone (default: config `zone`).")
PROJECT_OPTION = typer.Option(None, "--project", "-p", help="Project (default: config `project`).")
SSH_USER_OPTION = typer.Option(
    None, "--ssh-user", help="Login user (default: config `ssh.user`, else your user name)."
)
INTERNAL_IP_OPTION = typer.Option(
    None, "--internal-ip/--external-ip", help="Connect to internal IPs (inside the VPC)."
)
CONNECT_TIMEOUT_OPTION = typer.Option(
    10.0, "--connect-timeout", help="Seconds per connection.", callback=seconds("--connect-timeout")
)
EXIT_INTERRUPTED = 130
PROGRESS_EVERY_S = 5.0


class DashDashCommand(TyperCommand):
    """A command whose arguments after `--` are kept verbatim in `ctx.meta["after_dashdash"]`
    (the remote command, or extra ssh arguments) instead of being mixed with NAME."""

    def parse_args(self, ctx, args):
        if "--" in args:
            split = args.index("--")
            ctx.meta["after_dashdash"], args = args[split + 1 :], args[:split]
        else:
            ctx.meta["after_dashdash"] = []
        return super().parse_args(ctx, args)


@dataclass
class Target:
    """The node and hosts a command acts on; `cached` when the addresses came from the
    address cache (so a connection failure is worth a fresh lookup)."""

    settings: Settings
    node: Node
    workers: list[int] | None
    hosts: list[Host]
    cached: bool


def _settings(zone, project, ssh_user=None, internal_ip=None) -> Settings:
    return config.load(
        {"zone": zone, "project": project, "ssh.user": ssh_user, "ssh.internal_ip": internal_ip}
    )


def _target(settings: Settings, name: str | None, worker: str | None, all_workers: bool) -> Target:
    from tpuctl.hosts import hosts_for, lookup_node_noting_cache, parse_workers

    if worker is not None and all_workers:
        raise TpuctlError("--worker and --all-workers both given; keep one")
    node, cached = lookup_node_noting_cache(settings, name)
    if not node.ready:
        raise TpuctlError(
            f"node {node.name} is {node.state}, not READY; see `tpuctl status {node.name}`",
            exit_code=1,
        )
    from tpuctl.fanout.holder import attach_node

    workers = parse_workers(worker, len(node.workers))
    hosts = hosts_for(settings, node, workers)
    attach_node(settings, node, hosts if workers is None else hosts_for(settings, node))
    return Target(settings, node, workers, hosts, cached)


def _fan_out(target: Target, action, **kwargs) -> list[HostResult]:
    """Run `action(hosts, **kwargs)`; if cached addresses turned out unreachable, look the
    node up again and retry the workers whose address changed or whose node was recreated
    (new VMs, new host keys)."""
    from tpuctl.hosts import moved_hosts

    results = action(target.hosts, **kwargs)
    unreachable = [r.host for r in results if r.unreachable]
    if not unreachable or not target.cached:
        return results
    try:
        moved = moved_hosts(target.settings, target.node.name, target.workers, unreachable)
    except TpuctlError as err:
        print(f"note: {err}", file=sys.stderr)
        return results
    if not moved:
        return results
    labels = " ".join(h.label for h in moved)
    old = {h.label: h.address for h in unreachable}
    if any(old[h.label] != h.address for h in moved):
        note = f"addresses of {labels} changed; retrying with the node's new addresses"
    else:
        note = f"{target.node.name} was recreated; retrying {labels} with its new host keys"
    print(note, file=sys.stderr)
    retried = {r.host.label: r for r in action(moved, **kwargs)}
    return [retried.get(r.host.label, r) for r in results]


def _progress_every() -> float:
    """Seconds between progress lines; TPUCTL_TIME_SCALE shortens it (down to 0.2 s)."""
    from tpuctl.durations import time_scale

    return max(0.2, PROGRESS_EVERY_S * time_scale())


def _summarise(reporter, results: list[HostResult], interrupted: bool = False) -> None:
    """The fan-out summary, plus the likely fix when workers refused the login."""
    from tpuctl.fanout.base import AUTH_FAILED

    reporter.summary(results, interrupted=interrupted)
    if any(r.error and AUTH_FAILED in r.error for r in results):
        print(
            "hint: the workers refused the SSH key; for nodes gcloud created, "
            "`tpuctl config set ssh.key ~/.ssh/google_compute_engine`, and check --ssh-user",
            file=sys.stderr,
        )


def _result_json(result: HostResult) -> dict[str, Any]:
    return {
        "worker": result.host.label,
        "address": result.host.address,
        "exit_code": result.exit_code,
        "ok": result.ok,
        "error": result.error,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "duration_s": round(result.duration, 3),
    }


# -- exec -------------------------------------------------------------------------------


@app.command("exec", cls=DashDashCommand)
def exec_(
    ctx: typer.Context,
    name: str | None = NODE_ARGUMENT,
    name_option: str | None = NODE_NAME_OPTION,
    worker: str | None = WORKER_OPTION,
    all_workers: bool = ALL_WORKERS_OPTION,
    timeout: float | None = typer.Option(
        None, "--timeout", help="Seconds per worker.", callback=seconds("--timeout")
    ),
    env: list[str] = typer.Option([], "--env", "-e", help="K=V, or K to pass your $K."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop all once one fails."),
    json_out: bool = typer.Option(False, "--json", help="Per-worker results as JSON."),
    ssh_user: str | None = SSH_USER_OPTION,
    internal_ip: bool | None = INTERNAL_IP_OPTION,
    connect_timeout: float = CONNECT_TIMEOUT_OPTION,
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
) -> None:
    """Run COMMAND (after `--`) on every worker at once: `tpuctl exec -- hostname`."""
    name = chosen_node(name, name_option)
    from tpuctl.fanout import STREAMED_TAIL_BYTES, Interrupted, StopSignal, run
    from tpuctl.fanout.report import Reporter

    command = " ".join(ctx.meta["after_dashdash"])
    if not command.strip():
        raise TpuctlError("no command: put it after --, e.g. `tpuctl exec -- hostname`")
    variables = parse_env_flags(env)
    target = _target(_settings(zone, project, ssh_user, internal_ip), name, worker, all_workers)
    stop = StopSignal()
    reporter = Reporter(
        target.hosts, stream_lines=not json_out, progress_every=_progress_every(), stop=stop
    )
    try:
        with reporter:
            results = _fan_out(
                target,
                run,
                command=command,
                env=variables,
                timeout=timeout,
                fail_fast=fail_fast,
                connect_timeout=connect_timeout,
                on_line=reporter.on_line,
                # The lines are streamed: the summary's last lines are all that is read
                # afterwards, but --json prints every byte.
                keep_tail=None if json_out else STREAMED_TAIL_BYTES,
                on_result=reporter.on_result,
                stop=stop,
            )
    except Interrupted as interrupted:
        results, exit_code = interrupted.results, EXIT_INTERRUPTED
    else:
        exit_code = 0 if all(r.ok for r in results) else 1
    if json_out:
        from tpuctl.cli.output import print_json

        print_json([_result_json(r) for r in results])
    _summarise(reporter, results, interrupted=exit_code == EXIT_INTERRUPTED)
    raise typer.Exit(exit_code)


# -- ssh --------------------------------------------------------------------------------


@app.command("ssh", cls=DashDashCommand)
def ssh(
    ctx: typer.Context,
    name: str | None = NODE_ARGUMENT,
    name_option: str | None = NODE_NAME_OPTION,
    worker: int = typer.Option(0, "--worker", "-w", help="Worker number (default: 0)."),
    ssh_user: str | None = SSH_USER_OPTION,
    internal_ip: bool | None = INTERNAL_IP_OPTION,
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
) -> None:
    """A shell on one worker; arguments after `--` go to ssh (e.g. -L 6006:localhost:6006)."""
    name = chosen_node(name, name_option)
    target = _target(_settings(zone, project, ssh_user, internal_ip), name, str(worker), False)
    host = target.hosts[0]
    extra = ctx.meta["after_dashdash"]
    if host.transport == "local":
        os.chdir(str(host.workdir))
        os.environ["TMPDIR"] = str(Path(str(host.workdir)) / "tmp")
        shell = os.environ.get("SHELL", "bash")
        os.execvp(shell, [shell, *(["-c", " ".join(extra)] if extra else [])])
    os.execvp("ssh", ssh_argv(host, extra))


def ssh_argv(host: Host, extra: list[str]) -> list[str]:
    """The OpenSSH command line for an interactive login with fan-out's key and host keys."""
    options, command = _split_ssh_args(extra)
    # `--` before the destination: nothing that comes from settings is read as an option.
    return [_ssh_binary(), *_ssh_options(host), *options, "--", _destination(host), *command]


def _ssh_options(host: Host) -> list[str]:
    """Port, keys, host keys and the way in (jump host or ProxyCommand) of one host."""
    argv = ["-p", str(host.port), "-o", "IdentitiesOnly=yes"]
    for key in (host.key_filename, *host.identity_files):
        if key and os.path.exists(key):
            argv += ["-i", key]
    if host.known_hosts:
        config.private_dir(Path(host.known_hosts).parent)
        argv += ["-o", f"UserKnownHostsFile={host.known_hosts}"]
        argv += ["-o", "StrictHostKeyChecking=accept-new"]
        if pinned := _pinned_algorithms(host):  # as the fan-out: no other key type gets in
            argv += ["-o", f"HostKeyAlgorithms={','.join(pinned)}"]
    if host.jump:
        # Not -J: the jump host needs the keys and host keys tpuctl uses for it too.
        # The target is spelled out, since ssh expands %h in the whole command.
        through = [_ssh_binary(), *_ssh_options(host.jump), "-W", f"{host.address}:{host.port}"]
        argv += ["-o", f"ProxyCommand={shlex.join([*through, '--', _destination(host.jump)])}"]
    elif host.proxy_command:
        argv += ["-o", f"ProxyCommand={host.proxy_command}"]
    return argv


def _destination(host: Host) -> str:
    return f"{host.user}@{host.address}" if host.user else host.address


def _ssh_binary() -> str:
    return shutil.which("ssh") or "ssh"


# ssh(1) options that take an argument (`-L 6006:localhost:6006`, `-o BatchMode=yes`).
_SSH_OPTIONS_WITH_ARGUMENT = set("BbcDEeFIiJLlmOoPpQRSWw")


def _split_ssh_args(extra: list[str]) -> tuple[list[str], list[str]]:
    """The user's extra ssh arguments split into leading options and the remote command,
    which ssh takes only after the destination."""
    options: list[str] = []
    rest = list(extra)
    while rest and rest[0].startswith("-") and rest[0] != "-":
        token = rest.pop(0)
        if token == "--":
            break
        options.append(token)
        flags = token[1:]
        for position, flag in enumerate(flags):
            if flag in _SSH_OPTIONS_WITH_ARGUMENT:
                if position == len(flags) - 1 and rest:  # its argument is the next word
                    options.append(rest.pop(0))
                break
    return options, rest


def _pinned_algorithms(host: Host) -> list[str]:
    from tpuctl.fanout.ssh import KnownHosts

    return KnownHosts(host.known_hosts).pinned_algorithms(host)


# -- put / get --------------------------------------------------------------------------


def _report_transfers(results: list[HostResult], json_out: bool) -> None:
    from tpuctl.fanout.report import Reporter

    reporter = Reporter([r.host for r in results])
    if json_out:
        from tpuctl.cli.output import print_json

        print_json([_result_json(r) for r in results])
    else:
        for result in results:
            text = result.stdout or result.stderr or result.error or ""
            reporter.on_line(result.host, "stdout" if result.ok else "stderr", text.strip())
    _summarise(reporter, results)
    raise typer.Exit(0 if all(r.ok for r in results) else 1)


@app.command("put")
def put(
    local: Path = typer.Argument(..., help="Local file or directory."),
    remote: str = typer.Argument(..., help="Path on the workers (relative: home directory)."),
    name: str | None = NAME_OPTION,
    worker: str | None = WORKER_OPTION,
    all_workers: bool = ALL_WORKERS_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Per-worker results as JSON."),
    ssh_user: str | None = SSH_USER_OPTION,
    internal_ip: bool | None = INTERNAL_IP_OPTION,
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
) -> None:
    """Copy a local file or directory to the same path on every worker."""
    from tpuctl import fanout

    try:
        fanout.put_source(local)
    except (FileNotFoundError, ValueError) as err:
        raise TpuctlError(f"LOCAL {err}") from None
    target = _target(_settings(zone, project, ssh_user, internal_ip), name, worker, all_workers)
    results = _fan_out(target, fanout.put, local_path=local, remote_path=remote)
    _report_transfers(results, json_out)


@app.command("get")
def get(
    remote: str = typer.Argument(..., help="Path on the workers (file or directory)."),
    local_dir: Path = typer.Argument(..., help="Local directory: one subdirectory per worker."),
    name: str | None = NAME_OPTION,
    worker: str | None = WORKER_OPTION,
    all_workers: bool = ALL_WORKERS_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Per-worker results as JSON."),
    ssh_user: str | None = SSH_USER_OPTION,
    internal_ip: bool | None = INTERNAL_IP_OPTION,
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
) -> None:
    """Copy REMOTE from every worker into LOCAL_DIR/<worker>/."""
    from tpuctl import fanout

    target = _target(_settings(zone, project, ssh_user, internal_ip), name, worker, all_workers)
    results = _fan_out(target, fanout.get, remote_path=remote, local_dir=local_dir)
    _report_transfers(results, json_out)


# -- clear-locks / check ----------------------------------------------------------------


def _run_script(target: Target, script: str, timeout: float) -> list[HostResult]:
    from tpuctl.fanout import Interrupted, run
    from tpuctl.fanout.report import Reporter

    reporter = Reporter(target.hosts, stream_lines=False, progress_every=_progress_every())
    try:
        with reporter:
            return _fan_out(
                target, run, command=script, timeout=timeout, on_result=reporter.on_result
            )
    except Interrupted as interrupted:
        _summarise(reporter, interrupted.results, interrupted=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command("clear-locks")
def clear_locks(
    name: str | None = NODE_ARGUMENT,
    name_option: str | None = NODE_NAME_OPTION,
    worker: str | None = WORKER_OPTION,
    all_workers: bool = ALL_WORKERS_OPTION,
    force: bool = typer.Option(
        False, "--force", help="Remove even while a process holds the TPU device."
    ),
    ssh_user: str | None = SSH_USER_OPTION,
    internal_ip: bool | None = INTERNAL_IP_OPTION,
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
) -> None:
    """Remove the TPU runtime's stale lockfile and logs (/tmp/libtpu_lockfile, /tmp/tpu_logs)
    on every worker; refuses where a live process holds the TPU, unless --force."""
    name = chosen_node(name, name_option)
    from tpuctl.fanout.report import Reporter
    from tpuctl.worker_scripts import REFUSED_EXIT, clear_locks_script, parse_lock_report

    target = _target(_settings(zone, project, ssh_user, internal_ip), name, worker, all_workers)
    results = _run_script(target, clear_locks_script(force), timeout=60)
    reporter = Reporter(target.hosts)
    for result in results:
        report = parse_lock_report(result.stdout)
        if result.exit_code == REFUSED_EXIT:
            line = f"refused: {'; '.join(report.holders)} holds the TPU (stop it, or --force)"
        elif result.error is not None:
            line = result.error
        else:
            parts = [
                f"removed {', '.join(report.removed)}" if report.removed else "nothing to remove"
            ]
            parts += [f"could not remove {', '.join(report.failed)}"] * bool(report.failed)
            parts += [f"forced despite {'; '.join(report.holders)}"] * bool(report.holders)
            line = "; ".join(parts)
        reporter.on_line(result.host, "stdout" if result.ok else "stderr", line)
    _summarise(reporter, results)
    raise typer.Exit(0 if all(r.ok for r in results) else 1)


@app.command("check")
def check(
    name: str | None = NODE_ARGUMENT,
    name_option: str | None = NODE_NAME_OPTION,
    worker: str | None = WORKER_OPTION,
    all_workers: bool = ALL_WORKERS_OPTION,
    python: str | None = typer.Option(
        None, "--python", help="Python with jax on the workers (default: the trainer's)."
    ),
    timeout: float = typer.Option(
        120.0, "--timeout", help="Seconds per worker.", callback=seconds("--timeout")
    ),
    json_out: bool = typer.Option(False, "--json", help="Per-worker health as JSON."),
    ssh_user: str | None = SSH_USER_OPTION,
    internal_ip: bool | None = INTERNAL_IP_OPTION,
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
) -> None:
    """Health of every worker: its Python and jax versions, does JAX see the devices, do
    all workers agree, is the TPU held by another process, how much disk and memory are free."""
    name = chosen_node(name, name_option)
    from dataclasses import asdict, fields

    from tpuctl.worker_scripts import WorkerHealth, check_script, health_verdict, parse_health

    target = _target(_settings(zone, project, ssh_user, internal_ip), name, worker, all_workers)
    script = check_script(python) if python else _trainer_check_script(target)
    results = _run_script(target, script, timeout=timeout)
    health = {r.host.label: parse_health(r.stdout) for r in results if r.error is None}
    problems = health_verdict(results, health)
    if json_out:
        from tpuctl.cli.output import print_json

        # A worker that gave no answer (unreachable, timed out) has every field too, null
        # (not an empty `holders`: nobody looked): a script reads the same keys off each row.
        no_answer = dict.fromkeys(f.name for f in fields(WorkerHealth))
        rows = [
            {"worker": r.host.label, "address": r.host.address, "error": r.error}
            | (asdict(health[r.host.label]) if r.host.label in health else no_answer)
            for r in results
        ]
        print_json({"healthy": not problems, "problems": problems, "workers": rows})
    else:
        _print_health(results, health, problems)
    raise typer.Exit(0 if not problems else 1)


def _trainer_check_script(target: Target) -> str:
    """`check` with the interpreter `run` starts the trainer with: worker.python, or the
    venv tpuctl prepares (python3 where it was not made yet)."""
    from tpuctl import workerenv
    from tpuctl.worker_scripts import check_script

    env = workerenv.WorkerEnv.from_settings(target.settings, target.node, accelerator=True)
    if env.python:
        return check_script(env.python)
    return check_script(workerenv.VENV_PYTHON, fallback=env.base_python)


def _print_health(results, health, problems: list[str]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from tpuctl.cli.output import err_console, print_table

    table = Table(
        "worker", "address", "python", "jax", "devices", "local", "TPU held by", "disk free",
        "mem free",
    )  # fmt: skip
    for result in results:  # what workers print is text, never rich markup: escape it
        row = health.get(result.host.label)
        if row is None:
            error = escape(str(result.error))
            table.add_row(result.host.label, result.host.address, f"[red]{error}[/red]")
            continue
        jax_error = escape(row.jax_error or "-")
        devices = str(row.devices) if row.devices is not None else f"[red]{jax_error}[/red]"
        table.add_row(
            result.host.label,
            result.host.address,
            escape(row.python or "?"),
            escape(row.jax or "-"),
            devices,
            str(row.local_devices) if row.local_devices is not None else "-",
            escape("; ".join(row.holders) or "-"),
            f"{row.disk_free_gb:.1f} GB" if row.disk_free_gb is not None else "?",
            f"{row.mem_free_gb:.1f} GB" if row.mem_free_gb is not None else "?",
        )
    print_table(table)
    if problems:
        err_console.print("[bold red]✗ unhealthy[/bold red]")
        for problem in problems:
            err_console.print(f"  {problem}", markup=False)
    else:
        agree = f"all {len(results)} workers agree" if len(results) > 1 else "1 worker"
        err_console.print(f"[bold green]✓ healthy: {agree}[/bold green]")
