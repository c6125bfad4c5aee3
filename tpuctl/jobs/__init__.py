"""Jobs on a pod's workers: launch, status, logs and kill, over the fan-out.

One set of bash scripts serves SSH workers and local-pod workers alike. On each worker a
job lives in `${TPUCTL_WORKER_DIR:-$HOME/.tpuctl}/jobs/RUN_ID/`: `log` (stdout and stderr),
`pid` (the job's process group: it runs under setsid, detached from the session that
started it), `started` (epoch seconds) and `exit_status` (written when it ends).
`jobs/current` names the worker's latest run. The job's environment (secrets included)
travels through the fan-out's environment channel, never through any argv.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from tpuctl.errors import TpuctlError
from tpuctl.fanout import STREAMED_TAIL_BYTES, Host, HostResult, Interrupted, run
from tpuctl.wording import plural
from tpuctl.worker_scripts import holders_function

BUSY_EXIT = 75  # a job (or another process) holds the worker
NO_RUN_EXIT = 3  # logs: the worker has no such run
DEFAULT_GRACE_S = 30.0
# Lines from workers other than 0 that `logs` shows by default: errors and tracebacks.
ERROR_LINE = (
    r"Traceback|[Ee]rror|Exception|FATAL|Fatal|CRITICAL|^\s+File \"|Killed|Aborted|"
    r"Segmentation fault|tpuctl: job failed"
)
# Runtime chatter that says nothing to the user, hidden from `logs` and `ps` unless raw:
# gloo's per-collective "[Gloo] Rank 3 is connected to 15 peer ranks. Expected number of
# connected peer ranks is : 15", written in pieces that interleave between threads, so a line
# can be any piece ("Expected number of ...", " peer ranks. ...") or a bare rank number;
# jax's warning that the trainer's own `jax_enable_recoverability` is experimental; absl's
# start-up banner and XLA/TF C++ INFO lines.
NOISE_LINE = (
    r"\[Gloo\]|peer ranks|^[0-9]+$|\] Using experimental recoverable task feature|"
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called|"
    r"^I[0-9]{4} [0-9:.]+ +[0-9]+ [^ ]+:[0-9]+\] "
)
# How far back `ps` looks for the newest line that is not chatter.
STATUS_TAIL_LINES = 200

_PRELUDE = r"""
set -u
jobs_dir="${TPUCTL_WORKER_DIR:-$HOME/.tpuctl}/jobs"
lockfile="${TMPDIR:-/tmp}/libtpu_lockfile"
current_run() { cat "$jobs_dir/current" 2>/dev/null; }
run_pid() { cat "$jobs_dir/$1/pid" 2>/dev/null; }
# A group is alive while any member is not a zombie (orphans may never be reaped here).
group_alive() {
  [ -n "${1:-}" ] && ps -eo pgid=,stat= |
    awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}
# The run's process group id, while that group is still the run's job. Pids are reused:
# long after the job ended its group id can be a new process's, whose group is not ours.
# The job's wrapper leads its group, named by its arguments (tpuctl-job RUN_DIR ...); a
# group whose leader is gone (or a zombie) still holds only the job's own processes,
# since Linux gives no new process a pid in use as a group id.
job_group() {
  local pid args
  pid=$(run_pid "$1") && group_alive "$pid" || return 1
  args=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null)
  if [ -n "$args" ] && ! printf '%s\n' "$args" | grep -qxF "$jobs_dir/$1"; then return 1; fi
  echo "$pid"
}
# Processes holding the TPU devices or libtpu's lockfile (worker_scripts' tpu_holders).
accelerator_holders() { tpu_holders | cut -d' ' -f1 | sort -un; }
process_alive() { ps -o stat= -p "$1" 2>/dev/null | grep -qv '^Z'; }
# SIGTERM a process group (group PGID) or one process (process PID), SIGKILL it after
# GRACE seconds; prints which signal ended it.
stop_after_grace() {
  local alive=${1}_alive target=$2 ticks
  [ "$1" = group ] && target=-$2
  kill -TERM -- "$target" 2>/dev/null
  ticks=$(awk -v g="$3" 'BEGIN {print int(g * 10) + 1}')
  while [ "$ticks" -gt 0 ] && $alive "$2"; do sleep 0.1; ticks=$((ticks - 1)); done
  if $alive "$2"; then
    kill -KILL -- "$target" 2>/dev/null
    ticks=50
    while [ "$ticks" -gt 0 ] && $alive "$2"; do sleep 0.1; ticks=$((ticks - 1)); done
    echo SIGKILL
  else
    echo SIGTERM
  fi
}
# Stop a run's job on purpose: the marker tells its wrapper this is no failure; if the
# wrapper itself had to be SIGKILLed, record the end it could not.
stop_run() {
  local run_dir="$jobs_dir/$1" signal
  : > "$run_dir/stopping"
  signal=$(stop_after_grace group "$(job_group "$1")" "$grace")
  if [ ! -f "$run_dir/exit_status" ]; then
    echo "tpuctl: job stopped by tpuctl ($signal)" >>"$run_dir/log"
    echo 137 > "$run_dir/exit_status"
  fi
  echo "$signal"
}
stop_holders() {
  for pid in $(accelerator_holders); do
    echo "holder $pid $(cat "/proc/$pid/comm" 2>/dev/null) $(stop_after_grace process "$pid" "$grace")"
  done
}
clear_locks() { [ -n "$(accelerator_holders)" ] || rm -f "$lockfile"; }
"""

# Runs under setsid in the job's own session; its pid is the job's process group id.
# The TERM trap keeps it alive to record the trainer's exit status after SIGTERM; a
# failure is noted in the log, so a worker killed without a word (OOM) still shows up.
_JOB_WRAPPER = r"""
run_dir=$1; shift
echo $$ > "$run_dir/pid.tmp" && mv "$run_dir/pid.tmp" "$run_dir/pid"
trap : TERM
"$@" >>"$run_dir/log" 2>&1 </dev/null
status=$?
if [ -f "$run_dir/stopping" ]; then
  echo "tpuctl: job stopped by tpuctl (exit status $status)" >>"$run_dir/log"
elif [ "$status" -gt 128 ]; then
  echo "tpuctl: job failed: killed by signal $((status - 128))" >>"$run_dir/log"
elif [ "$status" -ne 0 ]; then
  echo "tpuctl: job failed with exit status $status" >>"$run_dir/log"
fi
echo "$status" > "$run_dir/exit_status.tmp" && mv "$run_dir/exit_status.tmp" "$run_dir/exit_status"
"""

_LAUNCH = r"""
mkdir -p "$jobs_dir"
current=$(current_run)
if [ -n "$current" ] && job_group "$current" >/dev/null; then
  [ "$force" = 1 ] || { echo "busy $current"; exit 75; }
  echo "stopped $current $(stop_run "$current")"
fi
holders=$(accelerator_holders)
if [ -n "$holders" ]; then
  [ "$force" = 1 ] || { echo "held" $holders; exit 75; }
  stop_holders
fi
clear_locks
run_dir="$jobs_dir/$run_id"
mkdir -p "$run_dir"
rm -f "$run_dir/pid" "$run_dir/exit_status" "$run_dir/stopping"
[ -f "$run_dir/log" ] && mv -f "$run_dir/log" "$run_dir/log.previous"
: > "$run_dir/log"
date +%s > "$run_dir/started"
echo "$run_id" > "$jobs_dir/current"
setsid bash -c "$job_wrapper" tpuctl-job "$run_dir" "${job_command[@]}" >/dev/null 2>&1 </dev/null &
ticks=100
while [ "$ticks" -gt 0 ] && [ ! -s "$run_dir/pid" ]; do sleep 0.05; ticks=$((ticks - 1)); done
[ -s "$run_dir/pid" ] || { echo "the job did not start; see $run_dir/log" >&2; exit 1; }
echo "started $(cat "$run_dir/pid") $run_dir/log"
"""

_STATUS = r"""
if ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then echo accelerator=tpu
else echo accelerator=none; fi
echo "holders=$(accelerator_holders | tr '\n' ' ')"
[ -n "$run_id" ] || run_id=$(current_run)
if [ -z "$run_id" ] || [ ! -d "$jobs_dir/$run_id" ]; then echo state=absent; exit 0; fi
run_dir="$jobs_dir/$run_id"
echo "run_id=$run_id"
if job_group "$run_id" >/dev/null; then echo state=running
else
  echo state=exited
  [ -f "$run_dir/exit_status" ] && echo "exit_code=$(cat "$run_dir/exit_status")" &&
    echo "ended=$(stat -c %Y "$run_dir/exit_status")"
  [ -f "$run_dir/stopping" ] && echo stopped_by_tpuctl=1
fi
echo "started=$(cat "$run_dir/started" 2>/dev/null)"
echo "now=$(date +%s)"
echo "last=$(tail -n "$status_tail" "$run_dir/log" 2>/dev/null | grep -avE "$noise_line" |
  grep -a '[^[:space:]]' | tail -n 1 | tr -d '\r')"
"""

_LOGS = r"""
[ -n "$run_id" ] || run_id=$(current_run)
# Silent: `tpuctl logs` says it once for the workers that answered so, not once per worker.
[ -n "$run_id" ] && [ -d "$jobs_dir/$run_id" ] || exit 3
log="$jobs_dir/$run_id/log"
quiet() { if [ "$raw" = 1 ]; then cat; else grep --line-buffered -avE "$noise_line"; fi; }
only_errors() {
  if [ "${TPUCTL_LOG_ONLY_ERRORS:-0}" = 1 ]; then grep --line-buffered -E "$error_line"; else cat; fi
}
show() { quiet | only_errors; }
pid=$(job_group "$run_id")
if [ "$follow" = 1 ] && [ -n "$pid" ]; then
  # tail ends once this watcher (our own child, so it is reaped) sees the job gone.
  ( while group_alive "$pid"; do sleep 0.5; done ) &
  tail -n "$lines" -F --pid=$! "$log" 2>/dev/null | show
else
  tail -n "$lines" "$log" 2>/dev/null | show
fi
exit 0
"""

_KILL = r"""
current=$(current_run)
pid=""
[ -n "$current" ] && pid=$(job_group "$current")
if [ -n "$only" ] && [ "$current" != "$only" ] && [ -n "$pid" ]; then
  echo "other $current"  # someone else's run: left running, its lockfiles too
  exit 0
fi
if [ -n "$pid" ]; then
  echo "killed $current $(stop_run "$current")"
else
  echo "idle ${current:--}"
fi
[ "$force" = 1 ] && stop_holders
clear_locks
exit 0
"""


@dataclass(frozen=True)
class JobSpec:
    """What `launch` starts on every worker."""

    run_id: str
    command: list[str]  # the job's argv, identical on every worker (no secrets here)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # secrets go here
    force: bool = False  # stop a running job (and other accelerator holders) first
    grace: float = DEFAULT_GRACE_S


@dataclass(frozen=True)
class WorkerJob:
    """One worker's view of its latest (or a named) run, as `ps` shows it."""

    label: str
    state: str  # running | exited | absent | unreachable
    run_id: str | None = None
    exit_code: int | None = None
    uptime: float | None = None
    last_line: str = ""
    accelerator: bool = False
    holders: tuple[str, ...] = ()  # pids holding the TPU devices or lockfile
    error: str | None = None
    stopped_by_tpuctl: bool = False  # ended by `kill`, `run --force` or a babysitter's stop


@dataclass(frozen=True)
class KillReport:
    """What `kill` did on one worker."""

    label: str
    run_id: str | None  # the run it stopped, None if nothing ran
    signal: str | None  # SIGTERM if the job ended within the grace period, else SIGKILL
    holders: list[str]  # "PID COMM SIGNAL" for other accelerator holders stopped (--force)
    error: str | None = None
    other_run: str | None = None  # a run other than `only`, left running


class JobBusy(TpuctlError):
    """A job or another process already holds some workers."""


def job_hosts(hosts: Iterable[Host]) -> list[Host]:
    """Hosts whose job records live in the right place: a local worker's own directory."""
    placed = []
    for host in hosts:
        if host.transport == "local" and host.workdir:
            env = {**host.env, "TPUCTL_WORKER_DIR": f"{host.workdir}/.tpuctl"}
            host = dataclasses.replace(host, env=env)
        placed.append(host)
    return placed


def _script(body: str, **params: object) -> str:
    assignments = "".join(f"{name}={_shell_value(value)}\n" for name, value in params.items())
    return holders_function() + _PRELUDE + assignments + body


def _shell_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return "(" + " ".join(shlex.quote(str(v)) for v in value) + ")"
    return shlex.quote(str(value))


def status(hosts: Iterable[Host], run_id: str | None = None) -> list[WorkerJob]:
    """Each worker's latest run (or `run_id`): running, exited with its code, or absent."""
    script = _script(
        _STATUS, run_id=run_id or "", noise_line=NOISE_LINE, status_tail=STATUS_TAIL_LINES
    )
    results = run(job_hosts(hosts), script, timeout=60)
    return [_parse_status(result) for result in results]


def _parse_status(result: HostResult) -> WorkerJob:
    label = result.host.label
    if not result.ok:
        reason = result.error or result.stderr.strip() or f"exit {result.exit_code}"
        return WorkerJob(label, "unreachable", error=reason)
    fields: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key not in fields:
            fields[key] = value
    exit_text = fields.get("exit_code", "")
    started = _number(fields.get("started"))
    end = _number(fields.get("ended")) or _number(fields.get("now"))
    return WorkerJob(
        label=label,
        state=fields.get("state", "absent"),
        run_id=fields.get("run_id"),
        exit_code=int(exit_text) if exit_text.lstrip("-").isdigit() else None,
        uptime=end - started if started is not None and end is not None else None,
        last_line=fields.get("last", ""),
        accelerator=fields.get("accelerator") == "tpu",
        holders=tuple(fields.get("holders", "").split()),
        stopped_by_tpuctl=fields.get("stopped_by_tpuctl") == "1",
    )


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def launch(
    hosts: Iterable[Host], spec: JobSpec, current: list[WorkerJob] | None = None
) -> list[HostResult]:
    """Start `spec.command` detached on every worker, refusing if a job already runs there.

    `current` is the workers' status if the caller just took it (saves a round trip).
    Raises JobBusy naming the running run and the workers (unless `spec.force`), or a
    TpuctlError naming the workers where the job did not start; on Ctrl-C (Interrupted)
    the job is stopped wherever it had started first.
    """
    hosts = job_hosts(hosts)
    if not spec.force:
        # Check everywhere first: a worker's own refusal would come after others started.
        refuse_if_busy(status(hosts) if current is None else current)
    script = _script(
        _LAUNCH,
        run_id=spec.run_id,
        force=spec.force,
        grace=spec.grace,
        job_wrapper=_JOB_WRAPPER,
        job_command=spec.command,
    )
    try:
        results = run(hosts, script, env=spec.env, timeout=120)
    except Interrupted:
        # Ctrl-C with the job started on some workers only (others still stopping the job
        # --force replaces): those would wait for the rest of the pod to join, for minutes.
        kill(hosts, grace=spec.grace, only=spec.run_id)
        raise
    failed = [r for r in results if not r.ok]
    if not failed:
        return results
    # Half a job is no job: stop it where it did start.
    kill([r.host for r in results if r.ok], grace=spec.grace)
    busy = [r for r in failed if r.exit_code == BUSY_EXIT]
    if busy:  # something started between the status check and the launch
        raise JobBusy(_busy_message([(r.host.label, r.stdout.strip()) for r in busy]), 1)
    details = "; ".join(f"{r.host.label}: {_failure(r)}" for r in failed)
    raise TpuctlError(f"the job did not start on {plural(len(failed), 'worker')}: {details}", 1)


def replaced(results: list[HostResult]) -> list[str]:
    """What a `force` launch stopped first, from its workers' reports: one line per run and
    signal (`--force: stopped run R on w00, w01 (SIGTERM)`; SIGKILL: it did not stop in
    time, so its newest steps may not be saved), one per other process holding the TPU."""
    stopped: dict[tuple[str, str], list[str]] = {}
    holders = []
    for result in results:
        for line in result.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word == "stopped":
                run_id, _, signal = rest.partition(" ")
                stopped.setdefault((run_id, signal), []).append(result.host.label)
            elif word == "holder":  # PID COMM SIGNAL
                holders.append(f"--force: killed {rest} holding the TPU on {result.host.label}")
    runs = [
        f"--force: stopped run {run_id} on {', '.join(labels)} ({signal})"
        + ("" if signal == "SIGTERM" else ": it did not stop in time; its newest steps may be lost")
        for (run_id, signal), labels in stopped.items()
    ]
    return runs + holders


def refuse_if_busy(jobs: list[WorkerJob]) -> None:
    """Raise JobBusy if a job runs on any worker, a TpuctlError if one could not be checked."""
    unreachable = [j for j in jobs if j.state == "unreachable"]
    if unreachable:
        details = "; ".join(f"{j.label}: {j.error}" for j in unreachable)
        raise TpuctlError(f"cannot check workers before launching: {details}", 1)
    running = [(j.label, f"busy {j.run_id}") for j in jobs if j.state == "running"]
    if running:
        raise JobBusy(_busy_message(running), 1)
    held = [(j.label, "held " + " ".join(j.holders)) for j in jobs if j.holders]
    if held:
        raise JobBusy(_busy_message(held), 1)


def _busy_message(busy: list[tuple[str, str]]) -> str:
    runs = sorted({text.split(" ", 1)[1] for _, text in busy if text.startswith("busy ")})
    labels = ", ".join(label for label, _ in busy)
    if runs:
        return (
            f"run {', '.join(runs)} is still running on {labels}; stop it with `tpuctl kill` "
            "or replace it with --force"
        )
    holders = "; ".join(f"{label}: pids {text.removeprefix('held ')}" for label, text in busy)
    return f"other processes hold the TPU ({holders}); stop them or use --force to kill them"


def _failure(result: HostResult) -> str:
    text = result.error or result.stderr.strip() or result.stdout.strip()
    return text.splitlines()[-1] if text else f"exit {result.exit_code}"


def logs(
    hosts: Iterable[Host],
    *,
    run_id: str | None = None,
    lines: int | None = None,
    follow: bool = False,
    all_lines: bool = False,
    raw: bool = False,
    on_line: Callable[[Host, str, str], None],
) -> list[HostResult]:
    """Stream each worker's job log to `on_line(host, stream, line)`.

    By default the first host shows everything and the others only error lines
    (`all_lines`: everything from every host), runtime chatter (NOISE_LINE) left out
    unless `raw`.
    `follow` keeps streaming until the job has exited on every worker; `lines` is how
    many lines of history to start from (None: all). The log goes to `on_line` alone: the
    results hold only the last `STREAMED_TAIL_BYTES` of each stream, however long it follows.
    """
    # Per-host switch, so one fan-out serves both kinds of worker.
    hosts = [
        dataclasses.replace(
            host, env={**host.env, "TPUCTL_LOG_ONLY_ERRORS": "0" if all_lines or i == 0 else "1"}
        )
        for i, host in enumerate(job_hosts(hosts))
    ]
    script = _script(
        _LOGS,
        run_id=run_id or "",
        lines="+1" if lines is None else lines,
        follow=follow,
        error_line=ERROR_LINE,
        noise_line=NOISE_LINE,
        raw=raw,
    )
    return run(hosts, script, on_line=on_line, keep_tail=STREAMED_TAIL_BYTES)


def kill(
    hosts: Iterable[Host],
    *,
    grace: float = DEFAULT_GRACE_S,
    force: bool = False,
    only: str | None = None,
) -> list[KillReport]:
    """Stop the current job on every worker: SIGTERM to its process group, SIGKILL after
    `grace` seconds, then clear stale lockfiles. `force` also stops any other process
    holding the TPU. With `only`, a worker running another run leaves it be and reports
    it (`other_run`). Nothing running is not an error."""
    script = _script(_KILL, grace=grace, force=force, only=only or "")
    results = run(job_hosts(hosts), script, timeout=grace + 60)
    return [_parse_kill(result) for result in results]


def _parse_kill(result: HostResult) -> KillReport:
    label = result.host.label
    if not result.ok:
        return KillReport(label, None, None, [], error=_failure(result))
    run_id = signal = None
    holders = []
    for line in result.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "killed":
            run_id, _, signal = rest.partition(" ")
        elif word == "holder":
            holders.append(rest)
        elif word == "other":
            return KillReport(label, None, None, [], other_run=rest)
    return KillReport(label, run_id, signal or None, holders)


def new_run_id(stem: str) -> str:
    """A run id from a recipe name and the current time: tiny-20261123-141502."""
    import time

    from tpuctl.naming import MAX_RUN_ID, validate_run_id

    stamp = time.strftime("%Y%m%d-%H%M%S")
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).lstrip(".-")[: MAX_RUN_ID - len(stamp) - 1]
    return validate_run_id(f"{clean.rstrip('-') or 'run'}-{stamp}", "recipe name")
