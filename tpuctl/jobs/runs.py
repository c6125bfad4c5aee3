"""`tpuctl run`: from a recipe on this machine to the trainer running on every worker.

Steps, each failing with one line before anything is launched: validate the recipe with
the trainer's own loader, check no job runs, store the resolved recipe in GCS
(gs://BUCKET/tpuctl/runs/RUN_ID/recipe.yaml, so every worker and any later relaunch read
the same copy), prepare the workers' environment, then launch detached on all workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpuctl import jobs, storage, workerenv
from tpuctl.errors import TpuctlError
from tpuctl.fanout import Host

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.providers.base import Node

LOCAL_POD_BUCKET = "tpuctl-local"
# jax.distributed's usual coordinator port, for CPU pods whose workers are separate hosts.
COORDINATOR_PORT = 8476
# Recipe keys that hold file paths: made absolute before the recipe leaves this machine.
_PATH_KEYS = (("run_dir",), ("tokenizer", "path"), ("model", "init_from"), ("data", "cache_dir"))
_PATH_LIST_KEYS = (("data", "train"), ("data", "eval"))


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


def start_run(
    settings: Settings,
    node: Node,
    hosts: list[Host],
    request: RunRequest,
    progress: Callable[[str], None],
) -> StartedRun:
    """Validate, store, prepare and launch; returns where everything is."""
    storage_env = _storage_env(node)
    os.environ.update(storage_env)  # this process reads and writes the same GCS
    recipe = load_recipe(request.recipe, request.overrides)
    check_fits_node(recipe, node)
    run_id = request.run_id or jobs.new_run_id(recipe.run_id)
    recipe = dataclasses.replace(recipe, run_id=run_id)
    worker_jobs = jobs.status(hosts)
    if not request.force:
        jobs.refuse_if_busy(worker_jobs)
    uri = storage.recipe_uri(_bucket(settings, node), run_id)
    storage.upload_text(uri, resolved_recipe_yaml(recipe))
    cpu = _is_cpu_pod(settings, node, worker_jobs)
    worker_env = workerenv.WorkerEnv.from_settings(settings, node, accelerator=not cpu)
    workerenv.prepare(hosts, worker_env, progress)
    env = {**recipe.env, **storage_env, **(_cpu_pod_env(node) if cpu else {}), **request.env}
    launch_hosts = _with_process_ids(hosts) if cpu else hosts
    command = [*worker_env.launcher(env), "-m", "trainer", uri]
    spec = jobs.JobSpec(run_id=run_id, command=command, env=env, force=request.force)
    jobs.launch(launch_hosts, spec, current=worker_jobs)
    return StartedRun(run_id, uri, _absolute(recipe.run_dir), f".tpuctl/jobs/{run_id}/log", hosts)


def load_recipe(source: str, overrides: list[str]) -> Any:
    """The trainer's own validation, on this machine; errors are one line naming the key."""
    from trainer.config import RecipeError
    from trainer.config import load_recipe as trainer_load

    try:
        return trainer_load(source, overrides)
    except RecipeError as err:
        raise TpuctlError(f"recipe {source}: {err}") from None


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
    paths absolute (workers do not start in the directory you ran tpuctl from)."""
    import yaml

    data = dataclasses.asdict(recipe)
    for *parents, leaf in _PATH_KEYS:
        section = _section(data, parents)
        if section.get(leaf):
            section[leaf] = _absolute(section[leaf])
    for *parents, leaf in _PATH_LIST_KEYS:
        section = _section(data, parents)
        section[leaf] = [_absolute(p) for p in section.get(leaf) or []]
    return yaml.safe_dump(data, sort_keys=False)


def _section(data: dict, parents: list[str]) -> dict:
    for key in parents:
        data = data[key]
    return data


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _storage_env(node: Node) -> dict[str, str]:
    """GCS settings every process of the run shares: a configured emulator, or the local
    pods' own emulator (started on demand) so gs:// paths work on a local pod."""
    from tpuctl.gcs_emulator import emulator_env

    url = storage.emulator_url()
    if url is None and node.provider == "local":
        from tpuctl.providers.local import gcs_emulator_url

        url = gcs_emulator_url()
    return emulator_env(url) if url else {}


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
    platform = settings.get("worker.platform", "auto")
    if platform not in ("auto", "cpu", "tpu"):
        raise TpuctlError(f"worker.platform {platform!r} must be auto, cpu or tpu")
    if platform != "auto":
        return platform == "cpu"
    return node.provider == "local" or not any(job.accelerator for job in worker_jobs)


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


def _with_process_ids(hosts: list[Host]) -> list[Host]:
    """Each worker's TPUCTL_PROCESS_ID: its index (hosts are every worker, in order)."""
    return [
        dataclasses.replace(host, env={**host.env, "TPUCTL_PROCESS_ID": str(index)})
        for index, host in enumerate(hosts)
    ]


def run_summary(run_dir: str) -> dict[str, Any] | None:
    """The trainer's DONE record ({step, final, wall_time_s}) of a finished run, or None."""
    done = f"{run_dir.rstrip('/')}/DONE"
    if "://" in done:
        text = storage.read_text(done)
    else:
        path = Path(done)
        text = path.read_text() if path.is_file() else None
    return json.loads(text) if text else None
