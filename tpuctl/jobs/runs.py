"""`tpuctl run`: from a recipe on this machine to the trainer running on every worker.

Steps, each failing with one line before anything is launched: validate the recipe with
the trainer's own loader, check no job runs, that the recipe can resume the checkpoints in
its run_dir (trainer.resume, where this machine reads it) and that the run id is not another
run's (tpuctl.jobs.owner), store the resolved recipe in GCS
(gs://BUCKET/tpuctl/runs/RUN_ID/recipe.yaml, so every worker and any later relaunch read
the same copy), prepare the workers' environment, then launch detached on all workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpuctl import jobs, storage, workerenv
from tpuctl.config import local_user, worker_platform
from tpuctl.errors import TpuctlError
from tpuctl.fanout import Host
from tpuctl.jobs import launches, owner
from trainer.contract import DONE_PENDING

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.providers.base import Node

LOCAL_POD_BUCKET = "tpuctl-local"
# jax.distributed's usual coordinator port, for CPU pods whose workers are separate hosts.
COORDINATOR_PORT = 8476


class ResumeRefused(TpuctlError):
    """The recipe cannot resume the checkpoints in its run_dir (`refuse_unresumable`): every
    launch of it would be refused alike."""


@dataclass(frozen=True)
class RunRequest:
    """What the user asked `tpuctl run` for."""

    recipe: str  # local path or gs:// URI
    overrides: list[str] = field(default_factory=list)  # key=value, as the trainer takes them
    env: Mapping[str, str] = field(default_factory=dict)  # --env values (may be secrets)
    run_id: str | None = None
    force: bool = False


@dataclass(frozen=True)
class StartedRun:
    """Where a launched run lives, for the messages and for following it."""

    run_id: str
    recipe_uri: str
    run_dir: str
    worker_log: str  # the log's path on each worker, relative to its home
    hosts: list[Host]
    # Every env value the run was given (recipe file and --env): the stored recipe keeps
    # only the names, so a relaunch from it passes these again as its --env.
    env: Mapping[str, str] = field(default_factory=dict)


def start_run(
    settings: Settings,
    node: Node,
    hosts: list[Host],
    request: RunRequest,
    progress: Callable[[str], None],
) -> StartedRun:
    """Validate, store, prepare and launch; returns where everything is."""
    from trainer.config import absolute_path

    storage_env = _storage_env(node)
    os.environ.update(storage_env)  # this process reads and writes the same GCS
    recipe = load_recipe(request.recipe, request.overrides)
    secrets = run_env(recipe, request, progress)
    check_fits_node(recipe, node)
    run_id = request.run_id or jobs.new_run_id(recipe.run_id)
    recipe = dataclasses.replace(recipe, run_id=run_id)
    worker_jobs = jobs.status(hosts)
    if not request.force:
        jobs.refuse_if_busy(worker_jobs)
    uri = stored_recipe_uri(settings, node, run_id)
    readable_here = run_dir_is_here(recipe.run_dir, node.provider)
    if readable_here:
        refuse_unresumable(recipe)
    owner.claim(uri, run_id, owner.RunOwner(node.name, local_user()), absolute_path(recipe.run_dir))
    storage.upload_text(uri, resolved_recipe_yaml(recipe))
    if readable_here:
        _clear_stale_done(absolute_path(recipe.run_dir), recipe.train.steps, run_id, progress)
    cpu = _is_cpu_pod(settings, node, worker_jobs)
    worker_env = prepare_workers(settings, node, hosts, progress, cpu)
    env = {**secrets, **storage_env, **pod_env(node, cpu), **request.env}
    launch_hosts = _with_process_ids(hosts) if "TPUCTL_NUM_PROCESSES" in env else hosts
    # A container gets what the job gets: the run's variables and each worker's own.
    names = {*env, *(name for host in launch_hosts for name in host.env)}
    command = [*worker_env.launcher(names), "-m", "trainer", uri]
    spec = jobs.JobSpec(run_id=run_id, command=command, env=env, force=request.force)
    for line in jobs.replaced(jobs.launch(launch_hosts, spec, current=worker_jobs)):
        progress(line)
    run_dir = absolute_path(recipe.run_dir)
    launches.record(launches.Launch(node.name, run_id, run_dir, recipe.train.steps, time.time()))
    return StartedRun(run_id, uri, run_dir, f".tpuctl/jobs/{run_id}/log", hosts, secrets)


def refuse_unresumable(recipe: Any) -> None:
    """Refuse `recipe` here, before anything is stored, when the trainer would refuse to resume
    the checkpoints in its run_dir with it (trainer.resume: another objective.name,
    optimizer.name or model.init_from): stored, it would be the recipe every relaunch of the
    run trains, none of which could resume them, and the run's DONE record would be gone
    (`_clear_stale_done`). For a run directory this machine reads; storage trouble reading
    it leaves the refusal to the trainer, as on the workers' own disks."""
    from trainer.resume import CheckpointError, check_recipe

    try:
        check_recipe(recipe)
    except CheckpointError as err:
        raise ResumeRefused(str(err)) from None
    except Exception:  # unreadable from here (GCS trouble, no gcsfs): the trainer checks it
        return


def run_env(recipe: Any, request: RunRequest, progress: Callable[[str], None]) -> dict[str, str]:
    """The values of the recipe's `env:` names (the recipe's own, or `--env`, which wins)
    plus the other `--env` values. A name without a value (as in a stored recipe) needs
    `--env NAME`; values written in the recipe work, with a warning that they sit in plain
    text in the recipe file (tpuctl never stores them)."""
    carried = sorted(n for n, v in recipe.env.items() if v is not None and n not in request.env)
    if carried:
        progress(
            f"warning: recipe env {', '.join(carried)}: the value is in plain text in "
            f"{request.recipe} (or its overrides); pass it with --env NAME instead "
            "(tpuctl stores env names only)"
        )
    missing = [n for n, v in recipe.env.items() if v is None and n not in request.env]
    if missing:
        raise TpuctlError(
            f"recipe env {missing[0]} has no value here (stored recipes keep names only): "
            f"pass --env {missing[0]}=VALUE, or --env {missing[0]} to pass your own ${missing[0]}"
        )
    values = {n: v for n, v in recipe.env.items() if v is not None}
    return {**values, **request.env}


def prepare_workers(
    settings: Settings,
    node: Node,
    hosts: list[Host],
    progress: Callable[[str], None],
    cpu: bool | None = None,
) -> workerenv.WorkerEnv:
    """Prepare the workers' environment (what `tpuctl prepare`, `run` and the babysitter's
    relaunches do); `cpu` is whether the node is a CPU pod, found out if not given."""
    if cpu is None:
        cpu = _is_cpu_pod(settings, node, jobs.status(hosts))
    worker_env = workerenv.WorkerEnv.from_settings(settings, node, accelerator=not cpu)
    workerenv.prepare(hosts, worker_env, progress)
    return worker_env


def load_recipe(source: str, overrides: list[str]) -> Any:
    """The trainer's own validation, on this machine; errors are one line naming the key."""
    from tpuctl.fanout.base import env_problem
    from trainer.config import RecipeError
    from trainer.config import load_recipe as trainer_load

    try:
        recipe = trainer_load(source, overrides)
    except RecipeError as err:
        raise TpuctlError(f"recipe {source}: {err}") from None
    for name, value in recipe.env.items():  # here, not at launch: nothing is stored yet
        if problem := env_problem(name, value or ""):
            raise TpuctlError(f"recipe {source}: env: {problem}")
    return recipe


def check_fits_node(recipe: Any, node: Node) -> None:
    """The recipe's mesh and batch against the node's device count, before launching."""
    from tpuctl.providers.local import devices_per_host
    from trainer.config import RecipeError, check_batch_divisible, mesh_shape

    devices = len(node.workers) * devices_per_host(node.accelerator_type)
    try:
        check_batch_divisible(recipe.train, mesh_shape(recipe.mesh, devices))
    except RecipeError as err:
        raise TpuctlError(f"recipe on {node.name} ({devices} devices): {err}") from None


def resolved_recipe_yaml(recipe: Any) -> str:
    """The recipe as the workers will read it: overrides applied, presets expanded, local
    paths absolute (workers do not start in the directory you ran tpuctl from), and `env:`
    reduced to names (null values): the values travel through the environment channel,
    never into a file that everyone who can read the bucket can read."""
    import yaml

    from trainer.config import with_absolute_paths

    data = dataclasses.asdict(with_absolute_paths(recipe))
    data["env"] = dict.fromkeys(recipe.env)
    return yaml.safe_dump(data, sort_keys=False)


def _storage_env(node: Node) -> dict[str, str]:
    """GCS settings every process of the run shares (see `emulator_for`)."""
    from tpuctl.gcs_emulator import emulator_env

    url = emulator_for(node.provider)
    return emulator_env(url) if url else {}


def emulator_for(provider: str) -> str | None:
    """Where the gs:// files of a `provider` node's runs live: a configured emulator, else
    for a local pod the local pods' own (started on demand); None: Google Cloud Storage."""
    url = storage.emulator_url()
    if url is None and provider == "local":
        from tpuctl.providers.local import gcs_emulator_url

        url = gcs_emulator_url()
    return url


def stored_recipe_uri(settings: Settings, node: Node, run_id: str) -> str:
    """Where `run` stores the run's resolved recipe, which every relaunch reads."""
    return storage.recipe_uri(_bucket(settings, node), run_id)


def _bucket(settings: Settings, node: Node) -> str:
    bucket = settings.get("bucket")
    if bucket:
        return storage.bucket_name(str(bucket))
    if node.provider == "local":
        return LOCAL_POD_BUCKET
    raise TpuctlError(
        "no bucket for run files: `tpuctl run` stores the recipe in GCS so every worker reads "
        "the same copy; set one with `tpuctl config set bucket NAME` or TPUCTL_BUCKET"
    )


def _is_cpu_pod(settings: Settings, node: Node, worker_jobs: list[jobs.WorkerJob]) -> bool:
    """`worker.platform` (cpu | tpu), else: local pods are CPU, other nodes are CPU when
    no worker has TPU devices (the SSH test pod)."""
    platform = worker_platform(settings)
    if platform != "auto":
        return platform == "cpu"
    return node.provider == "local" or not any(job.accelerator for job in worker_jobs)


def pod_env(node: Node, cpu: bool) -> dict[str, str]:
    """The variables that make the run's processes one pod (with each worker's
    TPUCTL_PROCESS_ID), none for a single TPU host."""
    return _cpu_pod_env(node) if cpu else _tpu_pod_env(node)


def _cpu_pod_env(node: Node) -> dict[str, str]:
    """On CPU pods jax cannot discover the pod: name the coordinator and the pod's size,
    and give each process the type's devices per host as virtual CPU devices."""
    from tpuctl.providers.local import devices_per_host, free_port

    port = free_port() if node.provider == "local" else COORDINATOR_PORT
    devices = devices_per_host(node.accelerator_type)
    return {
        "TPUCTL_COORDINATOR": f"{node.workers[0].internal_ip}:{port}",
        "TPUCTL_NUM_PROCESSES": str(len(node.workers)),
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }


def _tpu_pod_env(node: Node) -> dict[str, str]:
    """On a TPU pod jax finds the pod itself; the processes meet at worker 0 first
    (`trainer.rendezvous`, on jax's coordinator port), so that one failing before it joins
    ends the others at once instead of after TPUCTL_INIT_TIMEOUT."""
    if len(node.workers) < 2:
        return {}
    return {
        "TPUCTL_RENDEZVOUS": node.workers[0].internal_ip,
        "TPUCTL_NUM_PROCESSES": str(len(node.workers)),
    }


def _with_process_ids(hosts: list[Host]) -> list[Host]:
    """Each worker's TPUCTL_PROCESS_ID: its index (hosts are every worker, in order)."""
    return [
        dataclasses.replace(host, env={**host.env, "TPUCTL_PROCESS_ID": str(index)})
        for index, host in enumerate(hosts)
    ]


def _clear_stale_done(
    run_dir: str, steps: int | None, run_id: str, progress: Callable[[str], None]
) -> None:
    """Before the launch, so that no one watching the run (a babysitter, `run --follow`) takes
    a DONE record from before for this launch's end, even if the launch fails before its
    trainer starts: one short of the recipe's steps (a finished run going on) is removed; with
    train.epochs, whose steps tpuctl cannot tell, it is marked pending for this launch
    (trainer.contract.DONE_PENDING), and the trainer removes the mark once it finds the
    run finished, or DONE to go on. Only for a run directory this machine shares with the
    workers (gs://, a local pod's); the trainer removes it too, where tpuctl cannot see it."""
    try:
        done = run_summary(run_dir, polling=True)
    except Exception:  # unreadable from here (GCS trouble, half written): the trainer sees to it
        return
    step = done.get("step") if isinstance(done, dict) else None
    if not isinstance(step, int) or (steps is not None and step >= steps):
        return
    path = f"{run_dir.rstrip('/')}/DONE"
    if steps is None:
        _write_done(path, json.dumps(done | {DONE_PENDING: run_id}) + "\n")
        progress(
            f"{run_dir} finished at step {step} before; its DONE record counts again once "
            "the trainer finds the run finished (with train.epochs tpuctl cannot tell)"
        )
        return
    if "://" in path:
        storage.delete(path)
    else:
        Path(path).unlink(missing_ok=True)
    progress(f"{run_dir} finished at step {step} before; going on to step {steps}")


def _write_done(path: str, text: str) -> None:
    """Replace the DONE record at `path` (gs:// or local) whole: readers see one or the other."""
    if "://" in path:
        storage.upload_text(path, text)
        return
    local = Path(path)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(local)


def run_dir_is_here(run_dir: str, provider: str) -> bool:
    """Whether this machine sees the run directory the workers of a `provider` node write:
    gs:// (the same storage) or a plain path on a provider whose workers share this
    machine's files (a local pod's). Any other path is on each worker's own disk, where
    this machine's file of that name is another one."""
    from tpuctl.providers import capabilities_of

    return "://" in run_dir or capabilities_of(provider).shared_filesystem


def final_summary(run_dir: str, node: Node, hosts: list[Host]) -> dict[str, Any] | None:
    """`run_summary` of a run that ended on `hosts` (every worker of `node`, in order), read
    where process 0 wrote it: here, or on worker 0's own disk."""
    here = run_dir_is_here(run_dir, node.provider)
    return run_summary(run_dir, worker=None if here else hosts[0])


def read_on_worker(
    host: Host, path: str, offset: int = 0, last: int | None = None
) -> tuple[int, bytes] | None:
    """(size, content) of the file at `path` on `host`'s own disk: from byte `offset` to its
    end, or only its `last` bytes; None while there is no such file."""
    from tpuctl.fanout import run

    quoted = shlex.quote(path)
    part = f"tail -c {last}" if last is not None else f"tail -c +{offset + 1}"
    script = f"[ -f {quoted} ] || exit 0; wc -c < {quoted}; {part} -- {quoted}"
    (result,) = run([host], script, timeout=60)
    if not result.ok:
        reason = result.error or result.stderr.strip() or f"exit {result.exit_code}"
        raise TpuctlError(f"could not read {path} on {result.host.label}: {reason}", 1)
    if not result.stdout:
        return None
    size, _, content = result.stdout.partition("\n")
    # Lines the trainer wrote whole are UTF-8 and come back byte for byte; only a line
    # still being written may end in a cut character, which the readers leave for later.
    return int(size), content.encode()


def run_summary(
    run_dir: str, polling: bool = False, worker: Host | None = None
) -> dict[str, Any] | None:
    """The trainer's DONE record ({step, final, wall_time_s}) of a finished run, or None,
    also while a launch tpuctl marked it pending for has not confirmed it (`_clear_stale_done`;
    `polling`: a gs:// read gives up after storage.POLL_RETRY_S). With `worker`, the run
    directory is the one on that worker's own disk."""
    done = f"{run_dir.rstrip('/')}/DONE"
    if worker is not None:
        found = read_on_worker(worker, done)
        text = found[1].decode() if found else None
    elif "://" in done:
        text = storage.read_text(done, polling)
    else:
        path = Path(done)
        text = path.read_text() if path.is_file() else None
    return _done_record(text)


def _done_record(text: str | None) -> dict[str, Any] | None:
    """A DONE file's record; None for none, or one a launch marked pending."""
    record = json.loads(text) if text and text.strip() else None
    return None if isinstance(record, dict) and DONE_PENDING in record else record


def find_run(run: str) -> tuple[str, str | None]:
    """(run directory, the GCS emulator its gs:// files are in, if any) of `run`: itself (a
    gs:// URI or a local directory), or the latest run tpuctl launched from this machine on
    the node named `run` (a local pod's in the local pods' emulator)."""
    if "://" in run or Path(run).is_dir():
        return run, storage.emulator_url()
    launch = launches.latest(run)
    if launch is None:
        raise TpuctlError(
            f"RUN {run!r} is neither a run directory nor a node with a run launched from this "
            "machine; give the run directory (local or gs://)"
        )
    from tpuctl.providers.local import LocalProvider

    provider = "local" if LocalProvider().get(run) is not None else "cloud"
    return launch.run_dir, emulator_for(provider) if "://" in launch.run_dir else None


def fetch_profile(run_dir: str, destination: Path) -> list[Path]:
    """Copy the trainer's trace (`train.profile_steps`, in {run_dir}/profile) to
    `destination`; returns the trace files (*.xplane.pb)."""
    source = f"{run_dir.rstrip('/')}/profile"
    if "://" in source:
        storage.download_prefix(source, destination)
    elif Path(source).is_dir():
        shutil.copytree(source, destination, dirs_exist_ok=True)
    elif not Path(run_dir).is_dir():
        raise TpuctlError(
            f"run directory {run_dir} is not on this machine (a worker's local disk?): "
            f"fetch it with `tpuctl get {source} DIR --worker 0`"
        )
    traces = sorted(destination.glob("plugins/profile/*/*.xplane.pb"))
    if not traces:
        raise TpuctlError(
            f"no trace in {source}: set train.profile_steps=[START,END] in the recipe and "
            "let the run pass step END",
            exit_code=1,
        )
    return traces
