"""trainer.checkpoint: sharded orbax saves and restores, on 1 and 4 jax.distributed CPU processes,
local and on a GCS emulator; committed-only resume, clear errors, SIGTERM, keep-last-K, timeouts.

Multi-device cases run this file as a worker script (`python tests/test_trainer_checkpoint.py
MODE DIR ...`) in child processes, each with its own CPU devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from polling import wait_for

from tpuctl.gcs_emulator import GcsEmulator, emulator_env
from trainer import io
from trainer.config import CheckpointConfig

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 4
DEVICES_PER_PROCESS = 2
WORKER_TIMEOUT_S = 120


# -- the worker: a small sharded train state driven through the Checkpointer ------------------


def _worker(mode: str, directory: str, options: dict) -> int:

    from trainer import distributed

    if "coordinator" in options:  # joined as the trainer joins a pod (its watch included)
        os.environ.update(
            TPUCTL_COORDINATOR=options["coordinator"],
            TPUCTL_NUM_PROCESSES=str(options["processes"]),
            TPUCTL_PROCESS_ID=str(options["process_id"]),
        )
        distributed.initialize()
    try:
        status = _work(mode, directory, options)
    except Exception as e:  # as `python -m trainer` does
        distributed.crash(e)
    distributed.finish()
    return status


def _work(mode: str, directory: str, options: dict) -> int:
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from trainer import contract, preemption
    from trainer.checkpoint import Checkpointer

    @flax.struct.dataclass
    class State:
        step: jax.Array
        params: dict
        opt_state: dict
        rng: jax.Array

    mesh = Mesh(np.array(jax.devices()).reshape(options["mesh"]), ("fsdp", "tp"))
    shardings = State(
        step=NamedSharding(mesh, P()),
        params={"w": NamedSharding(mesh, P("fsdp", "tp")), "b": NamedSharding(mesh, P("tp"))},
        opt_state={"mu": NamedSharding(mesh, P("fsdp", "tp"))},
        rng=NamedSharding(mesh, P()),
    )

    def state_at(step):  # every value a function of the step, so a restore can be checked
        w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) + step
        return State(
            step=jnp.int32(step),
            params={"w": w, "b": jnp.full((8,), step, jnp.bfloat16)},
            opt_state={"mu": w * 0.5},
            rng=jax.random.fold_in(jax.random.key(0), step),
        )

    make_state = jax.jit(state_at, out_shardings=shardings)
    if jax.process_index() == options.get("sigterm_before_checkpointer"):  # still starting up
        os.kill(os.getpid(), signal.SIGTERM)
    checkpointer = Checkpointer(directory, CheckpointConfig(**options["cfg"]))
    report: dict = {"process": jax.process_index()}
    if mode == "save":
        for step in range(1, options["steps"] + 1):
            checkpointer.maybe_save(make_state(step))
        checkpointer.close()
        report["latest"] = checkpointer.latest_step
    elif mode == "restore":
        restored = checkpointer.restore(jax.eval_shape(make_state, 0))
        step = int(restored.step)
        expected = make_state(step)
        same = jax.tree.map(
            lambda a, b: bool(jnp.array_equal(_unwrap_key(a), _unwrap_key(b))), restored, expected
        )
        report.update(step=step, equal=all(jax.tree.leaves(same)))
        shards = restored.params["w"].addressable_shards
        report.update(local_shards=len(shards), shard_shape=list(shards[0].data.shape))
    elif mode == "until_sigterm":
        step = 0
        preemption.started()  # as the trainer's loop: a SIGTERM now saves
        (Path(options["ready_dir"]) / str(jax.process_index())).touch()
        while True:
            step += 1
            if checkpointer.maybe_save(make_state(step)):
                checkpointer.close()
                print(json.dumps({**report, "stopped_at": step}), flush=True)
                return contract.EXIT_PREEMPTED
    elif mode == "hang":
        checkpointer.save(make_state(1))
        checkpointer.wait_until_committed()
        print("committed", flush=True)
        sys.stdin.readline()  # the test pauses the GCS server, then lets us go on
        checkpointer.save(make_state(2))
        checkpointer.close()
    print(json.dumps(report), flush=True)
    return 0


def _unwrap_key(x):
    import jax

    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


# -- launching workers ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Worker:
    """One worker process; its output goes to files (pipes nobody drains would block it)."""

    def __init__(self, command: list[str], env: dict, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "stdout", log_dir / "stderr"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(
                command, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True
            )

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def finish(self, expect_rc: int = 0) -> dict | None:
        """Wait for the exit; the JSON report on its last stdout line, if it got that far."""
        try:
            self.process.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        rc = self.process.returncode
        assert rc == expect_rc, f"worker exited {rc}:\n{self.stderr()[-3000:]}"
        last_line = (self.stdout().strip().splitlines() or [""])[-1]
        return json.loads(last_line) if last_line.startswith("{") else None


def _spawn(
    mode, directory, *, processes=1, devices=DEVICES_PER_PROCESS, mesh=None, **options
) -> list[Worker]:
    """Start `processes` workers of `devices` CPU devices each."""
    options.setdefault("cfg", {"every_steps": 2, "keep": 2, "async_save": True})
    options["mesh"] = mesh or [processes * devices, 1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    coordinator = f"127.0.0.1:{_free_port()}"
    log_root = Path(tempfile.mkdtemp(prefix=f"ckpt-{mode}-"))
    workers = []
    for process_id in range(processes):
        worker_options = dict(options)
        if processes > 1:
            worker_options.update(
                coordinator=coordinator, processes=processes, process_id=process_id
            )
        command = [sys.executable, __file__, mode, directory, json.dumps(worker_options)]
        workers.append(Worker(command, env, log_root / str(process_id)))
    return workers


def _finish(workers: list[Worker], expect_rc: int = 0) -> list[dict]:
    return [worker.finish(expect_rc) for worker in workers]


def _run(mode, directory, **kwargs) -> list[dict]:
    return _finish(_spawn(mode, directory, **kwargs))


@pytest.fixture(autouse=True)
def _worker_logs_in_tmp_path(tmp_path, monkeypatch):
    """`_spawn`'s log directories go to the test's tmp_path, which pytest prunes, not /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def local_dir(tmp_path) -> str:
    return str(tmp_path / "checkpoints")


# -- multi-process and multi-mesh ------------------------------------------------------------


def test_four_processes_save_sharded_to_gcs_and_restore_on_other_meshes(gcs):
    directory = "gs://test-bucket/run/checkpoints"
    saved = _run("save", directory, processes=PROCESSES, steps=5)
    assert [r["latest"] for r in saved] == [4] * PROCESSES
    assert io.listdir(directory)[:2] == ["2", "4"]
    # 4 processes again, but fsdp=4 x tp=2 instead of fsdp=8.
    restored = _run("restore", directory, processes=PROCESSES, mesh=[4, 2])
    assert all(r["step"] == 4 and r["equal"] for r in restored), restored
    assert all(r["local_shards"] == DEVICES_PER_PROCESS for r in restored)
    assert all(r["shard_shape"] == [4, 4] for r in restored)  # (16, 8) over fsdp=4 x tp=2
    # One process with 4 devices (a smaller slice).
    (single,) = _run("restore", directory, devices=4, mesh=[4, 1])
    assert single["step"] == 4 and single["equal"] and single["shard_shape"] == [4, 8]


@pytest.mark.slow
def test_four_processes_saving_every_step_to_gcs_commit_every_step(gcs):
    """The local pod's GCS under concurrent conditional writers: 4 processes, an async save
    at every one of 40 steps (with GCS preconditions ignored, concurrent OCDBT writers
    silently overwrote each other's manifests; see test_gcs_emulator.py)."""
    directory = "gs://test-bucket/every-step/checkpoints"
    cfg = {"every_steps": 1, "keep": 0, "async_save": True}  # keep every step
    workers = _spawn("save", directory, processes=PROCESSES, steps=40, cfg=cfg)
    assert [r["latest"] for r in _finish(workers)] == [40] * PROCESSES
    for worker in workers:
        assert "error" not in worker.stderr().lower(), worker.stderr()[-3000:]
    assert _committed_steps(directory, cfg) == list(range(1, 41))
    restored = _run("restore", directory, processes=PROCESSES, mesh=[4, 2], cfg=cfg)
    assert all(r["step"] == 40 and r["equal"] for r in restored), restored


def test_single_process_sync_save_local_restores_on_smaller_mesh(local_dir):
    cfg = {"every_steps": 3, "keep": 5, "async_save": False}
    (saved,) = _run("save", local_dir, devices=8, steps=7, cfg=cfg)
    assert saved["latest"] == 6
    (restored,) = _run("restore", local_dir, devices=2, mesh=[2, 1], cfg=cfg)
    assert restored == {**restored, "step": 6, "equal": True, "shard_shape": [8, 8]}


def test_milestones_stay_when_a_resumed_recipe_drops_milestone_every(local_dir):
    """They are kept forever; a resume under a recipe without milestone_every deleted them."""
    first = {"every_steps": 2, "keep": 2, "async_save": False, "milestone_every": 5}
    _run("save", local_dir, devices=2, steps=12, cfg=first)
    assert _committed_steps(local_dir, first) == [5, 10, 12]
    then = {"every_steps": 2, "keep": 2, "async_save": False}
    _run("save", local_dir, devices=2, steps=16, cfg=then)
    assert _committed_steps(local_dir, then) == [5, 10, 14, 16]


def test_a_save_timeout_past_a_c_int_is_no_limit_not_a_failed_save(local_dir):
    """checkpoint.save_timeout_s=1e300 passed validation, then every save failed (exit 74)."""
    cfg = {"every_steps": 1, "keep": 2, "async_save": True, "save_timeout_s": 1e300}
    (saved,) = _run("save", local_dir, devices=2, steps=3, cfg=cfg)
    assert saved["latest"] == 3


def test_a_cut_model_record_or_a_file_named_checkpoints_is_one_line(tmp_path):
    """Both were tracebacks: a JSONDecodeError, a FileExistsError."""
    from trainer.checkpoint import Checkpointer, CheckpointError, read_model_info

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.json").write_text('{"model": {"dim')
    with pytest.raises(CheckpointError, match=r"model\.json is not the model record"):
        read_model_info(str(tmp_path / "checkpoints"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointError, match=r"cannot use .*a-file for checkpoints"):
        Checkpointer(str(tmp_path / "a-file"), CheckpointConfig())


# -- SIGTERM -------------------------------------------------------------------------------


UNTIL_SIGTERM = {"every_steps": 1000, "keep": 2, "async_save": True}  # only a stop saves


def _spawn_until_sigterm(tmp_path, **options) -> list[Worker]:
    """Workers that save only when a SIGTERM stops them; each touches its own file in
    tmp_path/ready once it is in its loop (past start-up)."""
    (tmp_path / "ready").mkdir()
    return _spawn(
        "until_sigterm",
        str(tmp_path / "checkpoints"),
        processes=PROCESSES,
        cfg=UNTIL_SIGTERM,
        ready_dir=str(tmp_path / "ready"),
        **options,
    )


def _wait_until_all_train(tmp_path) -> None:
    ready = tmp_path / "ready"
    wait_for(lambda: len(list(ready.iterdir())) == PROCESSES, what="every worker's loop")


def test_sigterm_on_one_process_saves_current_step_on_all_and_exits_preempted(tmp_path):
    from trainer.checkpoint import Checkpointer
    from trainer.contract import EXIT_PREEMPTED

    workers = _spawn_until_sigterm(tmp_path)
    _wait_until_all_train(tmp_path)
    workers[2].process.send_signal(signal.SIGTERM)  # only one host hears it; all must stop
    reports = _finish(workers, expect_rc=EXIT_PREEMPTED)
    stopped = {r["stopped_at"] for r in reports}
    assert len(stopped) == 1, reports
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), CheckpointConfig(**UNTIL_SIGTERM))
    assert checkpointer.latest_step == stopped.pop()
    checkpointer.close()


def test_sigterm_while_one_process_is_still_starting_up_stops_every_process_at_once(tmp_path):
    """A SIGTERM after joining the pod and before training (loading weights, tokenizing,
    compiling) ends every process at once: there is nothing new to save. jax's preemption
    notifier used to swallow it, and the run trained on (this test then timed out)."""
    from trainer.contract import EXIT_PREEMPTED

    workers = _spawn_until_sigterm(tmp_path, sigterm_before_checkpointer=2)
    assert _finish(workers, expect_rc=EXIT_PREEMPTED) == [None] * PROCESSES  # none trained
    expected = (
        "trainer: stopped on SIGTERM while starting up (process 2 of 4): before training, "
        "nothing new to save"
    )
    for worker in workers:
        assert expected in worker.stderr().splitlines(), worker.stderr()[-3000:]
    assert _committed_steps(str(tmp_path / "checkpoints"), UNTIL_SIGTERM) == []


# -- fail-stop: a failed save or a dead process ends every process ---------------------------


def _committed_steps(directory: str, cfg: dict) -> list[int]:
    from trainer.checkpoint import Checkpointer

    checkpointer = Checkpointer(directory, CheckpointConfig(**cfg))
    steps = sorted(checkpointer._manager.all_steps())
    checkpointer.close()
    return steps


def _exit_times(workers: list[Worker]) -> list[float]:
    """Each worker's exit time (monotonic), waiting for all of them."""
    pending, times = set(range(len(workers))), [0.0] * len(workers)
    wait_for(lambda: _reap(workers, pending, times) or not pending, WORKER_TIMEOUT_S, "exits")
    return times


def _reap(workers, pending, times) -> None:
    for index in list(pending):
        if workers[index].process.poll() is not None:
            times[index] = time.monotonic()
            pending.discard(index)


def test_failed_save_on_one_process_ends_every_process_with_one_line(monkeypatch):
    from trainer.contract import EXIT_CHECKPOINT_IO

    directory = "gs://test-bucket/failing/checkpoints"
    cfg = {"every_steps": 1, "keep": 10, "async_save": True}
    # The emulator fails process 1's array writes of step 4 (403, which clients do not retry).
    with GcsEmulator(fail_writes=r"/checkpoints/4/default/ocdbt\.process_1/") as emulator:
        for name, value in emulator_env(emulator.url).items():
            monkeypatch.setenv(name, value)
        emulator.create_bucket("test-bucket")
        workers = _spawn("save", directory, processes=PROCESSES, steps=12, cfg=cfg)
        exits = _exit_times(workers)
        assert max(exits) - min(exits) < 60
        assert [w.process.returncode for w in workers] == [EXIT_CHECKPOINT_IO] * PROCESSES
        for worker in workers:
            err = worker.stderr()
            lines = [line for line in err.splitlines() if line.startswith("error: ")]
            assert lines == [lines[0]], err[-3000:]
            assert lines[0].startswith("error: checkpoint save of step 4 failed on process 1: ")
            assert "injected fault" in lines[0], err[-3000:]
            assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
        assert _committed_steps(directory, cfg) == [1, 2, 3]  # nothing trained on past 4


_GLOO_ABORT = "terminate called after throwing an instance of 'gloo::"


def test_killed_process_ends_the_others_naming_it(tmp_path):
    from trainer.distributed import EXIT_PEER_LOST

    workers = _spawn_until_sigterm(tmp_path)
    _wait_until_all_train(tmp_path)
    workers[2].process.kill()
    killed_at = time.monotonic()
    exits = _exit_times(workers)
    survivors = (0, 1, 3)
    assert all(exits[index] - killed_at < 60 for index in survivors)
    errors = {index: workers[index].stderr() for index in survivors}
    if any(_GLOO_ABORT in err for err in errors.values()):
        # Gloo (CPU collectives) can abort a process that was mid-collective with the dead
        # one; the pod still ends at once, but with Gloo's and jax's own messages.
        assert all(workers[index].process.returncode != 0 for index in survivors)
        return
    for index, err in errors.items():
        assert workers[index].process.returncode == EXIT_PEER_LOST, err[-3000:]
        assert (
            f"error: process 2 of 4 stopped (no heartbeat for 20 s); stopping process {index} too"
            in err
        ), err[-3000:]


# -- the save watchdog and half-written checkpoints on GCS -------------------------------------


def test_hung_gcs_save_times_out_and_leaves_last_committed_checkpoint(gcs, tmp_path):
    from trainer.contract import EXIT_CHECKPOINT_IO

    directory = "gs://test-bucket/hang/checkpoints"
    cfg = {"every_steps": 1, "keep": 3, "async_save": True, "save_timeout_s": 3}
    (worker,) = _spawn("hang", directory, cfg=cfg)
    wait_for(lambda: "committed" in worker.stdout(), what="the first save to commit")
    os.kill(gcs.pid, signal.SIGSTOP)  # GCS stops answering: the next save hangs
    try:
        worker.process.stdin.write("go\n")
        worker.process.stdin.flush()
        assert worker.finish(expect_rc=EXIT_CHECKPOINT_IO) is None  # it never got to the end
    finally:
        os.kill(gcs.pid, signal.SIGCONT)
    err = worker.stderr()
    assert "checkpoint save of step 2 failed on process 0: it did not commit" in err
    assert "checkpoint.save_timeout_s=3 s" in err
    (restored,) = _run("restore", directory, cfg=cfg)
    assert restored["step"] == 1 and restored["equal"]


# -- committed-only, errors, retention (in this process, on its devices) ---------------------


def _state(step: int, width: int = 4):
    import jax
    import jax.numpy as jnp

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class State:
        step: jax.Array
        params: dict

    return State(jnp.int32(step), {"w": jnp.full((width,), float(step))})


def _abstract(width: int = 4):
    import jax

    return jax.eval_shape(lambda: _state(0, width))


def _checkpointer(directory: str, **cfg):
    from trainer.checkpoint import Checkpointer

    return Checkpointer(directory, CheckpointConfig(**{"every_steps": 1, **cfg}))


def test_empty_directory_restores_none(local_dir):
    with _checkpointer(local_dir) as checkpointer:
        assert checkpointer.restore(_abstract()) is None


def test_a_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    from trainer.checkpoint import load_params

    monkeypatch.chdir(tmp_path)  # `run_dir: runs/tiny`, as recipes/tiny.yaml has it
    with _checkpointer("runs/tiny/checkpoints") as checkpointer:
        checkpointer.maybe_save(_state(1))
    assert load_params("runs/tiny/checkpoints")[0] == 1
    with _checkpointer("runs/tiny/checkpoints") as checkpointer:
        assert int(checkpointer.restore(_abstract()).step) == 1


def test_a_relative_tokenizer_path_is_recorded_absolute_for_export(tmp_path, monkeypatch):
    from trainer.checkpoint import Checkpointer, read_model_info
    from trainer.config import ModelConfig

    monkeypatch.chdir(tmp_path)  # `python -m trainer recipes/tiny.yaml` from the checkout
    cfg = CheckpointConfig(every_steps=1)
    Checkpointer("run", cfg, model=ModelConfig(), tokenizer_path="recipes/data/t.model").close()
    monkeypatch.chdir("/")  # `tpuctl export` from elsewhere
    tokenizer = read_model_info(str(tmp_path / "run"))[1]
    assert tokenizer == str(tmp_path / "recipes/data/t.model")


def _recorded(directory: str, width: int, objective: str | None = "lm"):
    """A Checkpointer recording a model of `width` and `objective`, as the trainer makes it."""
    from trainer.checkpoint import Checkpointer
    from trainer.config import ModelConfig

    cfg = CheckpointConfig(every_steps=1, async_save=False)
    return Checkpointer(directory, cfg, model=ModelConfig(dim=width), objective=objective)


def test_a_recipe_that_cannot_resume_a_run_leaves_its_model_record_alone(local_dir):
    from trainer.checkpoint import CheckpointError, read_model_info

    with _recorded(local_dir, width=4) as checkpointer:
        checkpointer.save(_state(1, width=4))
    changed = _recorded(local_dir, width=8)  # the recipe changed the model
    with changed as checkpointer, pytest.raises(CheckpointError, match="cannot be loaded"):
        checkpointer.restore(_abstract(width=8))
    assert read_model_info(local_dir)[0].dim == 4  # export still rebuilds the saved model
    with _recorded(local_dir, width=4) as checkpointer:
        assert int(checkpointer.restore(_abstract(width=4)).step) == 1


def test_a_resume_on_a_full_disk_writes_no_unchanged_model_record_and_fails_one_line(
    small_disk,
):
    """Every resume rewrote model.json, and on a full disk failed with an OSError traceback,
    exit 1: now an unchanged record is left as it is, and a record that must change but
    cannot be written is one line with EXIT_CHECKPOINT_IO, the record left intact."""
    from trainer.checkpoint import MODEL_INFO_FILE, Checkpointer, CheckpointError
    from trainer.config import ModelConfig
    from trainer.contract import EXIT_CHECKPOINT_IO

    directory = str(small_disk.path / "checkpoints")
    with _recorded(directory, width=4) as checkpointer:
        checkpointer.save(_state(1, width=4))
    record = Path(directory, MODEL_INFO_FILE).read_text()
    small_disk.fill()
    with _recorded(directory, width=4) as checkpointer:
        assert int(checkpointer.restore(_abstract(width=4)).step) == 1
    cfg = CheckpointConfig(every_steps=1, async_save=False)
    moved = Checkpointer(directory, cfg, model=ModelConfig(dim=4), tokenizer_path="/new/t.model")
    with moved as checkpointer, pytest.raises(CheckpointError) as failed:
        checkpointer.restore(_abstract(width=4))
    assert failed.value.status == EXIT_CHECKPOINT_IO
    assert str(failed.value) == (
        f"cannot write {directory}/{MODEL_INFO_FILE} ([Errno 28] No space left on device): "
        "free space there or make it writable, then start the run again"
    )
    assert Path(directory, MODEL_INFO_FILE).read_text() == record


def test_a_run_is_not_resumed_under_another_objective(local_dir):
    from trainer.checkpoint import CheckpointError

    with _recorded(local_dir, width=4, objective="lm") as checkpointer:
        checkpointer.save(_state(3, width=4))
    dpo = _recorded(local_dir, width=4, objective="dpo")
    with dpo as checkpointer, pytest.raises(CheckpointError) as refused:
        checkpointer.restore(_abstract(width=4))
    assert str(refused.value) == (
        f"{local_dir} holds checkpoints of an objective 'lm' run (newest step 3) and this "
        "recipe's objective is 'dpo': set a new run_dir (to start from that run's weights, "
        "export them with `python -m trainer.export` and set model.init_from to the export)"
    )
    with _recorded(local_dir, width=4, objective="lm") as checkpointer:
        assert int(checkpointer.restore(_abstract(width=4)).step) == 3
    with _recorded(local_dir, width=4, objective=None) as checkpointer:  # recorded by no one
        assert int(checkpointer.restore(_abstract(width=4)).step) == 3


def _started(directory: str, *overrides: str, init_from: str | None = None, dim: int = 4):
    """A Checkpointer as the trainer opens it for recipes/tiny.yaml with `overrides` (the
    model `dim` wide, to fit the small test state)."""
    from trainer.checkpoint import Checkpointer
    from trainer.config import load_recipe
    from trainer.resume import resume_settings

    recipe = load_recipe(str(REPO / "recipes" / "tiny.yaml"), [f"run_dir={directory}", *overrides])
    model = dataclasses.replace(recipe.model, dim=dim, init_from=init_from)
    cfg = CheckpointConfig(every_steps=1, async_save=False)
    return Checkpointer(directory, cfg, model=model, settings=resume_settings(recipe))


def test_a_resume_under_another_optimizer_or_init_from_is_refused_naming_both(
    local_dir, tmp_path, monkeypatch
):
    """optimizer.name: it was refused as "run with the model config it was saved with";
    model.init_from: a changed one was taken, and did nothing (the weights come from the
    checkpoint) but change a DPO run's reference."""
    from trainer.checkpoint import CheckpointError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    with _started(local_dir, init_from="base") as checkpointer:
        checkpointer.save(_state(3, width=4))
    lion = _started(local_dir, "optimizer.name=lion", init_from="base")
    with lion as checkpointer, pytest.raises(CheckpointError) as refused:
        checkpointer.restore(_abstract(width=4))
    assert str(refused.value) == (
        f"{local_dir} holds checkpoints of an optimizer.name 'adamw' run (newest step 3) and "
        "this recipe's optimizer.name is 'lion', whose optimizer state is another: set "
        "optimizer.name=adamw to resume it, or a new run_dir (to start from that run's "
        "weights, export them with `python -m trainer.export` and set model.init_from to the "
        "export)"
    )
    other = _started(local_dir, init_from="/models/other")
    with other as checkpointer, pytest.raises(CheckpointError) as refused:
        checkpointer.restore(_abstract(width=4))
    assert str(refused.value) == (
        f"{local_dir} holds checkpoints of a run started from model.init_from "
        f"{tmp_path}/base (newest step 3) and this recipe's model.init_from is /models/other: "
        f"a resume takes its weights from its checkpoint; set model.init_from={tmp_path}/base "
        "to resume it, or set a new run_dir to start from /models/other"
    )
    fresh = pytest.raises(CheckpointError, match=r"is none: .* to start from fresh weights$")
    with _started(local_dir) as checkpointer, fresh:
        checkpointer.restore(_abstract(width=4))
    with _started(local_dir, init_from=str(tmp_path / "base")) as checkpointer:  # the same dir
        assert int(checkpointer.restore(_abstract(width=4)).step) == 3


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_recipe_the_trainer_refuses_is_refused_from_the_run_dir_alone_in_its_words(
    where, request, tmp_path
):
    """`tpuctl run` stored such a recipe as the run's (what its relaunches train) before the
    trainer on the workers refused it: trainer.resume, which tpuctl calls without jax, now
    refuses what the restore refuses, with the same line, and takes what it takes."""
    from trainer.checkpoint import CheckpointError
    from trainer.config import load_recipe
    from trainer.resume import check_recipe

    run_dir = str(tmp_path)
    if where == "gcs":
        request.getfixturevalue("gcs")
        run_dir = "gs://test-bucket/refused"
    directory = io.join(run_dir, "checkpoints")
    base = tmp_path / "base"
    base.mkdir()

    def recipe(*overrides: str):
        return load_recipe(str(REPO / "recipes" / "tiny.yaml"), [f"run_dir={run_dir}", *overrides])

    check_recipe(recipe("optimizer.name=lion"))  # no checkpoint yet: nothing to refuse
    with _started(directory) as checkpointer:
        checkpointer.save(_state(3, width=4))
    refused = [
        (_started(directory, "optimizer.name=lion"), recipe("optimizer.name=lion")),
        (_started(directory, init_from=str(base)), recipe(f"model.init_from={base}")),
    ]
    for started, changed in refused:
        with started as checkpointer, pytest.raises(CheckpointError) as by_trainer:
            checkpointer.restore(_abstract(width=4))
        with pytest.raises(CheckpointError) as by_recipe:
            check_recipe(changed)
        assert str(by_recipe.value) == str(by_trainer.value)
    check_recipe(recipe("train.steps=4", "optimizer.lr=1e-3"))  # a resume takes these


def test_a_resume_names_the_settings_it_changed_and_a_failed_one_those_it_needs(local_dir, capsys):
    """Changes a resume takes (batch, lr, data) were taken silently; a checkpoint that does
    not load names the model config fields (or optimizer settings) that differ."""
    from trainer.checkpoint import CheckpointError

    with _started(local_dir) as checkpointer:
        checkpointer.save(_state(3, width=4))
    changed = ("train.batch_size=32", "optimizer.lr=1e-3", "data.train=[data/tiny_eval.txt]")
    with _started(local_dir, *changed) as checkpointer:
        assert int(checkpointer.restore(_abstract(width=4)).step) == 3
    eval_file = REPO / "recipes" / "data" / "tiny_eval.txt"
    assert capsys.readouterr().out.splitlines()[-1] == (
        "trainer: settings changed since the run last started, from step 3 on it trains with "
        "the new ones: train.batch_size 16 -> 32, optimizer.lr 0.003 -> 0.001, data.train "
        f'[{{"path": ["{eval_file.parent}/tiny_train.txt"]}}] -> [{{"path": ["{eval_file}"]}}]'
    )
    with _started(local_dir, *changed) as checkpointer:  # compared with the last start's
        checkpointer.restore(_abstract(width=4))
    assert "settings changed" not in capsys.readouterr().out
    with _started(local_dir, dim=8) as checkpointer, pytest.raises(CheckpointError) as failed:
        checkpointer.restore(_abstract(width=8))
    assert (
        "v1 API.); this recipe has model.dim 8 (the run's: 4): run with the run's settings, "
        in (str(failed.value))
    )


def test_keep_last_k_plus_milestones(local_dir):
    with _checkpointer(local_dir, every_steps=2, keep=2, milestone_every=5) as checkpointer:
        for step in range(1, 13):
            checkpointer.maybe_save(_state(step))
    assert sorted(int(n) for n in io.listdir(local_dir) if n.isdigit()) == [5, 10, 12]


def test_time_based_save_between_step_saves(local_dir):
    with _checkpointer(local_dir, every_steps=1000, every_minutes=1e-6) as checkpointer:
        checkpointer.maybe_save(_state(7))
        assert checkpointer.latest_step == 7
        restored = checkpointer.restore(_abstract())
    assert int(restored.step) == 7 and float(restored.params["w"][0]) == 7.0


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_uncommitted_checkpoint_is_ignored(where, request, local_dir):
    from trainer.resume import newest_step

    if where == "gcs":
        request.getfixturevalue("gcs")
        local_dir = "gs://test-bucket/uncommitted/checkpoints"
    with _checkpointer(local_dir, async_save=False) as checkpointer:
        checkpointer.save(_state(1))
        checkpointer.save(_state(2))
    # What a save cut short leaves: on GCS the step directory without its commit file,
    # locally a temporary directory that was never renamed to its step.
    if where == "gcs":
        io.remove(io.join(local_dir, "2", "commit_success.txt"))
    else:
        os.rename(f"{local_dir}/2", f"{local_dir}/2.orbax-checkpoint-tmp-1700000000")
    assert newest_step(local_dir) == 1  # as tpuctl reads it, without orbax
    with _checkpointer(local_dir) as checkpointer:
        assert checkpointer.latest_step == 1
        assert int(checkpointer.restore(_abstract()).step) == 1
        checkpointer.save(_state(2))  # the leftover does not block saving that step again
    assert newest_step(local_dir) == 2
    with _checkpointer(local_dir) as checkpointer:
        assert int(checkpointer.restore(_abstract()).step) == 2


def test_wrong_model_shape_is_a_clear_error_not_a_fresh_start(local_dir):
    from trainer.checkpoint import CheckpointError

    with _checkpointer(local_dir) as checkpointer:
        checkpointer.save(_state(3))
    with _checkpointer(local_dir) as checkpointer, pytest.raises(CheckpointError) as error:
        checkpointer.restore(_abstract(width=8))
    message = str(error.value)
    assert "checkpoint step 3" in message and "(8,)" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["metadata", "arrays"])
def test_corrupted_checkpoint_is_a_clear_error_not_a_fresh_start(damage, local_dir):
    from trainer.checkpoint import CheckpointError

    with _checkpointer(local_dir) as checkpointer:
        checkpointer.save(_state(1))
        checkpointer.save(_state(2))
    step_dir = Path(local_dir) / "2"
    if damage == "metadata":
        (step_dir / "default" / "_METADATA").write_text("{not json")
    else:
        shutil.rmtree(step_dir / "default" / "d")
        for manifest in (step_dir / "default").glob("**/manifest.ocdbt"):
            manifest.write_bytes(b"\0" * 16)
    with _checkpointer(local_dir) as checkpointer, pytest.raises(CheckpointError) as error:
        checkpointer.restore(_abstract())
    assert f"checkpoint step 2 in {local_dir} cannot be loaded" in str(error.value)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))


def _tensorstore_error(spec: dict) -> ValueError:
    import tensorstore as ts

    try:
        ts.open(spec, open=True).result()
    except ValueError as e:
        return e
    raise AssertionError("tensorstore opened it")


def _chained(error: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("restore of the train state failed") from error
    except RuntimeError as e:
        return e


def test_a_checkpoint_storage_failed_to_read_is_relaunched_one_of_another_model_is_not(tmp_path):
    """The exit status a failed restore gives: EXIT_CHECKPOINT_IO for storage trouble that may
    pass, which `tpuctl babysit` relaunches; EXIT_BAD_INPUT, which stops it, only for what
    fails alike on every launch."""
    from trainer.checkpoint import restore_failure_status
    from trainer.contract import EXIT_BAD_INPUT, EXIT_CHECKPOINT_IO

    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError as e:
        refused = e
    missing = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "gone")}}
    cases = [
        (refused, EXIT_CHECKPOINT_IO),
        (_chained(refused), EXIT_CHECKPOINT_IO),
        (ValueError("UNAVAILABLE: error reading gs://b/run/checkpoints/4: 503"), EXIT_CHECKPOINT_IO),
        (ValueError("DEADLINE_EXCEEDED: while reading shard"), EXIT_CHECKPOINT_IO),
        (_tensorstore_error(missing), EXIT_BAD_INPUT),  # a step missing its files
        (ValueError("Requested shape: (8, 512) is not compatible with the stored shape: (8, 256)"), EXIT_BAD_INPUT),
    ]  # fmt: skip
    assert [restore_failure_status(error) for error, _ in cases] == [s for _, s in cases]
