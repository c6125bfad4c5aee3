"""The bash that `clear-locks` and `check` run on every worker, and the parsers for what it
prints. Paths use `${TMPDIR:-/tmp}` so local-pod workers (each with its own TMPDIR) have
their own lockfiles; on TPU VMs TMPDIR is unset and the runtime's /tmp paths are used.

Each script prints one `key value...` record per line, so parsing never depends on the
wording of tools' messages.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tpuctl.fanout.base import HostResult

# Devices the TPU runtime opens: /dev/accel* on v2-v4, VFIO on v5e and later.
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/*")
# What a crashed or previous user's job leaves behind and blocks the next libtpu start.
LOCK_PATHS = ("libtpu_lockfile", "tpu_logs")
REFUSED_EXIT = 3

_PRELUDE = """\
tmp="${TMPDIR:-/tmp}"
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo -n"; fi
"""


def holders_function(device_globs: tuple[str, ...] = TPU_DEVICE_GLOBS) -> str:
    """The bash function `tpu_holders`, the one holder check of `run`, `kill`, `clear-locks`
    and `check`: prints `PID COMMAND TARGET` for every process with a TPU device or
    libtpu's lockfile open. It looks at every process on the VM, those in containers
    (other mount namespaces) included; a user other than root needs `sudo -n` to see other
    users' processes, and without it sees their own only."""
    tests = " -o ".join(f"-lname {shlex.quote(glob)}" for glob in device_globs)
    return f"""\
tpu_holders() {{
  local sudo="" lockfile="${{TMPDIR:-/tmp}}/libtpu_lockfile" fd pid comm
  if [ "$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then sudo="sudo -n"; fi
  $sudo find /proc/[0-9]*/fd -maxdepth 1 \\( {tests} -o -lname "$lockfile" \\) 2>/dev/null |
    while read -r fd; do
      pid=${{fd#/proc/}}; pid=${{pid%%/*}}
      [ "$pid" = "$$" ] && continue
      comm=$(tr -c '[:alnum:]._\\n-' _ 2>/dev/null <"/proc/$pid/comm" || echo '?')
      echo "$pid $comm $($sudo readlink "$fd")"
    done | sort -u
}}
"""


def _held(device_globs: tuple[str, ...]) -> str:
    return holders_function(device_globs) + 'held=$(tpu_holders | sed "s/^/held /")\n'


def clear_locks_script(force: bool, device_globs: tuple[str, ...] = TPU_DEVICE_GLOBS) -> str:
    """Remove the TPU runtime's lock and log files, unless a live process holds the device
    (then print who and exit REFUSED_EXIT) and `force` is False."""
    paths = " ".join(f'"$tmp/{name}"' for name in LOCK_PATHS)
    refuse = "" if force else f'if [ -n "$held" ]; then exit {REFUSED_EXIT}; fi\n'
    return (
        _PRELUDE
        + _held(device_globs)
        + '[ -n "$held" ] && echo "$held"\n'
        + refuse
        + f"""status=0
for path in {paths}; do
  if [ -e "$path" ] || [ -L "$path" ]; then
    if $sudo rm -rf -- "$path"; then echo "removed $path"; else echo "failed $path"; status=1; fi
  fi
done
exit $status
"""
    )


def check_script(
    python: str = "python3",
    device_globs: tuple[str, ...] = TPU_DEVICE_GLOBS,
    fallback: str | None = None,
) -> str:
    """Report device holders, the Python and jax versions and JAX's device counts (skipped
    while the device is held: JAX would block on it), free disk in $HOME and available
    memory. `fallback` is used where `python` is no executable file (a venv not made yet)."""
    probe = (
        "import jax; print('jax', jax.__version__); "
        "print('devices', jax.device_count(), jax.local_device_count())"
    )
    version = "import platform; print(platform.python_version())"
    return (
        _PRELUDE
        + f"python={shlex.quote(python)}\n"
        + (f'[ -x "$python" ] || python={shlex.quote(fallback)}\n' if fallback else "")
        + f'echo "python $("$python" -c {shlex.quote(version)} 2>/dev/null || echo "?")"\n'
        + _held(device_globs)
        + '[ -n "$held" ] && echo "$held"\n'
        + f"""if [ -z "$held" ]; then
  if out=$("$python" -c {shlex.quote(probe)} 2>&1); then
    echo "$out" | grep -E '^(jax|devices) '
  else
    echo "jax_error $(echo "$out" | tail -n 1)"
  fi
fi
df -Pk "$HOME" | awk 'NR==2 {{print "disk_free_kb", $4}}'
awk '/^MemAvailable:/ {{print "mem_free_kb", $2}}' /proc/meminfo
exit 0
"""
    )


@dataclass
class LockReport:
    """What clear-locks did on one worker."""

    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)  # "pid 123 (python3) on /dev/accel0"


def parse_lock_report(stdout: str) -> LockReport:
    report = LockReport()
    for kind, _, rest in (line.partition(" ") for line in stdout.splitlines()):
        if kind == "removed":
            report.removed.append(rest)
        elif kind == "failed":
            report.failed.append(rest)
        elif kind == "held":
            report.holders.append(_describe_holder(rest))
    return report


@dataclass
class WorkerHealth:
    """One worker's answers to `check`."""

    python: str | None = None  # the interpreter's version, e.g. 3.12.4
    jax: str | None = None
    devices: int | None = None  # jax.device_count(): the whole pod's devices
    local_devices: int | None = None
    jax_error: str | None = None
    holders: list[str] = field(default_factory=list)
    disk_free_gb: float | None = None
    mem_free_gb: float | None = None


def parse_health(stdout: str) -> WorkerHealth:
    health = WorkerHealth()
    for kind, _, rest in (line.partition(" ") for line in stdout.splitlines()):
        if kind == "devices":
            counts = rest.split()
            if len(counts) == 2 and all(c.isdigit() for c in counts):
                health.devices, health.local_devices = int(counts[0]), int(counts[1])
            else:
                health.jax_error = f"unexpected output: {rest}"
        elif kind == "python" and rest != "?":
            health.python = rest
        elif kind == "jax":
            health.jax = rest
        elif kind == "jax_error":
            health.jax_error = rest or "python exited with an error"
        elif kind == "held":
            health.holders.append(_describe_holder(rest))
        elif kind == "disk_free_kb" and rest.isdigit():
            health.disk_free_gb = int(rest) / 2**20
        elif kind == "mem_free_kb" and rest.isdigit():
            health.mem_free_gb = int(rest) / 2**20
    return health


def _describe_holder(record: str) -> str:
    pid, _, rest = record.partition(" ")
    command, _, device = rest.partition(" ")
    return f"pid {pid} ({command}) on {device}"


LOW_DISK_GB = 5.0


def health_verdict(results, health: dict[str, WorkerHealth]) -> list[str]:
    """One line per problem found by `check`; an empty list means the pod is healthy. A
    worker is healthy only on evidence: its probe finished with status 0 and printed the
    device counts (or named who holds the TPU)."""
    problems = [f"{r.host.label}: {_probe_failure(r)}" for r in results if _probe_failure(r)]
    counts: dict[int, list[str]] = {}
    for label, row in health.items():
        if row.holders:
            problems.append(f"{label}: TPU held by {'; '.join(row.holders)}")
        elif row.jax_error:
            problems.append(f"{label}: jax failed: {row.jax_error}")
        elif row.devices is None:
            problems.append(
                f"{label}: no device count: the interpreter printed none "
                "(is it a Python with jax? --python names another)"
            )
        if row.devices is not None:
            counts.setdefault(row.devices, []).append(label)
        if row.disk_free_gb is not None and row.disk_free_gb < LOW_DISK_GB:
            problems.append(f"{label}: only {row.disk_free_gb:.1f} GB free on disk")
    if len(counts) > 1:
        views = "; ".join(
            f"{n} devices on {' '.join(labels)}" for n, labels in sorted(counts.items())
        )
        problems.append(f"workers disagree on the device count: {views}")
    return problems


def _probe_failure(result: HostResult) -> str | None:
    """Why one worker's probe gave no answer to trust (unreachable, or a nonzero exit),
    or None."""
    if result.error is not None:
        return result.error
    if result.exit_code == 0:
        return None
    last = result.stderr.strip().splitlines()[-1:] or ["no error output"]
    return f"the check exited with status {result.exit_code}: {last[0]}"
