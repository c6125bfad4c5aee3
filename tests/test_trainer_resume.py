"""Exact resume: `python -m trainer` stopped at random steps (SIGKILL, or SIGTERM which saves
first) and started again reaches the same per-step losses and the same final parameters as an
uninterrupted run, bit for bit on the CPU; on 1 process (local run directory) and on 4
jax.distributed processes writing to a GCS emulator (SIGKILLed twice) on a mixture of
per-epoch subsets whose token cache those 4 processes build together; and a DPO run, whose
frozen reference must come back the same at every start."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_trainer import LEASE_TTL_ENV
from tests.polling import stopped, wait_for
from trainer import io, run_lock
from trainer.contract import EXIT_CHECKPOINT_IO, EXIT_PREEMPTED

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny.yaml"
STEPS = 24
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.grad_accum=1",
    "logging.every_steps=1",  # a loss for every step, to compare them all
    "eval.every_steps=0",
    "checkpoint.every_steps=4",
    "checkpoint.keep=2",
]
# Epochs of subsets crossed within the run: 87 + 40 rows an epoch, 192 rows in 24 steps.
MIXTURE = (
    "data.train=[{path: data/tiny_train.txt, fraction: 0.05}, {path: data/tiny_eval.txt, size: 40}]"
)
DPO = (
    "data.train=[data/tiny_preference.jsonl]",
    "data.eval=[]",
    "data.format=preference",
    "objective=dpo",
)
RUN_TIMEOUT_S = 240
PROGRESS = re.compile(r"^step (\d+) ", re.MULTILINE)


class TrainerPod:
    """`python -m trainer` on `processes` jax.distributed CPU processes (2 devices each)."""

    def __init__(self, run_dir: str, processes: int, logs: Path, extra: tuple[str, ...] = ()):
        port = _free_port()
        # In the test's tmp_path (which pytest prunes), not in /tmp.
        self.logs = Path(tempfile.mkdtemp(prefix="resume-", dir=logs))
        self.procs: list[subprocess.Popen] = []
        for index in range(processes):
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith("TPUCTL_") or k == LEASE_TTL_ENV  # the suite's short one
            }
            env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(REPO))
            if processes > 1:
                env.update(
                    TPUCTL_COORDINATOR=f"127.0.0.1:{port}",
                    TPUCTL_NUM_PROCESSES=str(processes),
                    TPUCTL_PROCESS_ID=str(index),
                )
            command = [sys.executable, "-m", "trainer", str(RECIPE), f"run_dir={run_dir}"]
            with open(self.logs / f"{index}.out", "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [*command, *OVERRIDES, *extra],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    def output(self, index: int = 0) -> str:
        return (self.logs / f"{index}.out").read_text(errors="replace")

    def last_step(self) -> int:
        steps = PROGRESS.findall(self.output())
        return int(steps[-1]) if steps else 0

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait_for_step(self, step: int) -> None:
        """Return once step `step` is done; the run must still be running then."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while self.running() and self.last_step() < step:
            assert time.monotonic() < deadline, f"no step {step} yet:\n{self.output()[-3000:]}"
            time.sleep(0.02)
        assert self.running(), f"the run ended before step {step}:\n{self.output()[-3000:]}"

    def stop_at(self, step: int, sig: int) -> int:
        """Send `sig` to every process once step `step` is done (as a preemption or `tpuctl kill`
        does); returns the step the run stopped at."""
        self.wait_for_step(step)
        for proc in self.procs:
            proc.send_signal(sig)
        codes = self.wait()
        if sig == signal.SIGKILL:
            return self.last_step()
        assert codes == [EXIT_PREEMPTED] * len(self.procs), (codes, self.output()[-3000:])
        stopped = re.search(r"trainer: stopped on SIGTERM at step (\d+)", self.output())
        assert stopped, self.output()[-3000:]
        return int(stopped[1])

    def wait(self) -> list[int]:
        for proc in self.procs:
            try:
                proc.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [proc.returncode for proc in self.procs]

    def finish(self) -> str:
        """Wait for a successful end; process 0's output."""
        for index, code in enumerate(self.wait()):
            assert code == 0, f"process {index} exited {code}:\n{self.output(index)[-3000:]}"
        return self.output()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(run_dir: str, key: str = "loss") -> dict[int, list[float]]:
    """Every value of `key` logged for each step, over all attempts."""
    losses: dict[int, list[float]] = {}
    for line in io.read_text(io.join(run_dir, "metrics.jsonl")).splitlines():
        record = json.loads(line)
        if key in record:
            losses.setdefault(record["step"], []).append(record[key])
    return losses


def _final_params(run_dir: str):
    from trainer.checkpoint import load_params

    return load_params(io.join(run_dir, "checkpoints"))


def _check_resumed_run_matches(reference: str, resumed: str, kills: list[int]) -> None:
    expected = {step: values[0] for step, values in _losses(reference).items()}
    assert sorted(expected) == list(range(1, STEPS + 1))
    got = _losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1)), f"steps missing after kills at {kills}"
    for step, values in got.items():
        assert values == [expected[step]] * len(values), f"step {step} (kills at {kills})"
    (ref_step, ref_params), (step, params) = _final_params(reference), _final_params(resumed)
    assert ref_step == step == STEPS
    flat_ref, flat = (sorted(_flatten(p).items()) for p in (ref_params, params))
    assert [name for name, _ in flat] == [name for name, _ in flat_ref]
    for (name, value), (_, ref_value) in zip(flat, flat_ref, strict=True):
        assert np.array_equal(value, ref_value), f"{name} differs (kills at {kills})"
    done = json.loads(io.read_text(io.join(resumed, "DONE")))
    assert done["step"] == STEPS


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        return {k: v for key in tree for k, v in _flatten(tree[key], f"{prefix}/{key}").items()}
    return {prefix: np.asarray(tree)}


def _interrupted_run(
    run_dir: str,
    processes: int,
    stops: list[tuple[int, int]],
    logs: Path,
    extra: tuple[str, ...] = (),
) -> list[int]:
    """Run to the end, stopping every process with each (signal, target step) in turn and
    starting again; returns the steps at which the attempts stopped."""
    stopped_at = [0]
    for sig, target in stops:  # each stop lands past the previous one, so the run advances
        pod = TrainerPod(run_dir, processes, logs, extra)
        stopped_at.append(pod.stop_at(max(target, stopped_at[-1] + 3), sig))
    output = TrainerPod(run_dir, processes, logs, extra).finish()
    resumed = re.search(r"trainer: resuming from checkpoint step (\d+) in ", output)
    assert resumed, output[-3000:]
    if stops[-1][0] == signal.SIGTERM:  # it saved the very step it stopped at
        assert int(resumed[1]) == stopped_at[-1]
    return stopped_at[1:]


def test_one_process_killed_and_resumed_matches_uninterrupted_run(tmp_path):
    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    TrainerPod(reference, 1, tmp_path).finish()
    first = random.randint(5, 10)
    stops = [(signal.SIGKILL, first), (signal.SIGTERM, random.randint(first + 3, 16))]
    kills = _interrupted_run(resumed, 1, stops, tmp_path)
    _check_resumed_run_matches(reference, resumed, kills)

    # Started again once finished, it trains nothing and keeps its DONE record.
    done = (Path(resumed) / "DONE").read_text()
    again = TrainerPod(resumed, 1, tmp_path).finish()
    assert f"trainer: run already finished at step {STEPS} in {resumed}" in again
    assert PROGRESS.search(again) is None
    assert (Path(resumed) / "DONE").read_text() == done

    # A committed checkpoint that cannot be read stops the run; it never restarts from step 0.
    checkpoints = Path(resumed) / "checkpoints"
    (checkpoints / str(STEPS) / "default" / "_METADATA").write_text("{not json")
    before = sorted(p.name for p in checkpoints.iterdir())
    pod = TrainerPod(resumed, 1, tmp_path)
    assert pod.wait() == [2]
    assert f"error: checkpoint step {STEPS} in {checkpoints} cannot be loaded" in pod.output()
    assert sorted(p.name for p in checkpoints.iterdir()) == before
    assert PROGRESS.search(pod.output()) is None  # not a single step trained


def test_four_processes_on_gcs_killed_twice_match_uninterrupted_run_on_a_mixture(gcs, tmp_path):
    reference, resumed = "gs://test-bucket/runs/reference", "gs://test-bucket/runs/resumed"
    output = TrainerPod(reference, 4, tmp_path, (MIXTURE,)).finish()
    train_summary = next(line for line in output.splitlines() if "tokens per dataset: " in line)
    assert "tiny_train.txt" in train_summary and "tiny_eval.txt" in train_summary
    first = random.randint(5, 10)
    targets = [first, random.randint(first + 3, 16)]
    stops = [(signal.SIGKILL, step) for step in targets]
    kills = _interrupted_run(resumed, 4, stops, tmp_path, (MIXTURE,))
    _check_resumed_run_matches(reference, resumed, kills)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["frozen", "precompute"])
def test_a_killed_dpo_run_resumes_to_the_uninterrupted_run(kind, tmp_path):
    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    extra = (*DPO, f"objective.reference={kind}")
    TrainerPod(reference, 1, tmp_path, extra).finish()
    stops = [(signal.SIGKILL, random.randint(5, 10)), (signal.SIGTERM, random.randint(13, 18))]
    kills = _interrupted_run(resumed, 1, stops, tmp_path, extra)
    _check_resumed_run_matches(reference, resumed, kills)
    if kind == "precompute":  # computed once; a start with trained checkpoints reads it back
        stored = Path(resumed) / "reference_logps" / "train.npy"
        written = stored.stat().st_mtime_ns
        output = TrainerPod(resumed, 1, tmp_path, extra).finish()
        assert f"trainer: reference log-probs of train read from {stored}" in output
        assert stored.stat().st_mtime_ns == written
    for key in ("rewards/margins", "logps/rejected"):  # the reference came back the same
        expected = {step: values[0] for step, values in _losses(reference, key).items()}
        for step, values in _losses(resumed, key).items():
            assert values == [expected[step]] * len(values), f"{key} step {step} ({kills})"


def test_a_finished_run_that_goes_on_has_no_done_record_until_it_ends_again(tmp_path):
    """Its DONE from before stayed while it trained: a babysitter took the continuation,
    preempted, for finished, and never relaunched it."""
    run_dir = tmp_path / "run"
    TrainerPod(str(run_dir), 1, tmp_path, ("train.steps=4",)).finish()
    assert json.loads((run_dir / "DONE").read_text())["step"] == 4
    going_on = TrainerPod(str(run_dir), 1, tmp_path, ("train.steps=12",))
    assert going_on.stop_at(7, signal.SIGTERM) >= 7
    assert "trainer: going on from step 4 to 12" in going_on.output()
    assert not (run_dir / "DONE").exists()


def test_a_resume_says_which_settings_it_changed_and_refuses_another_optimizer(tmp_path):
    """Another optimizer.name was refused as "run with the model config it was saved with";
    a batch size or learning rate changed on resume was taken without a word. Saves an
    earlier run left unfinished keep orbax's clean-up (a thread) busy as the refusal ends the
    process: its traceback ("cannot schedule new futures after shutdown") came after the
    refusal's line, which was then not the last."""
    run_dir = tmp_path / "run"
    TrainerPod(str(run_dir), 1, tmp_path, ("train.steps=2",)).finish()
    for step in range(3, 3003):  # unfinished saves, as a kill mid-save leaves them
        (run_dir / "checkpoints" / f"{step}.orbax-checkpoint-tmp-{step}").mkdir()
    lion = TrainerPod(str(run_dir), 1, tmp_path, ("train.steps=4", "optimizer.name=lion"))
    assert lion.wait() == [2]
    assert "Traceback" not in lion.output()
    assert not list((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp-*"))  # cleaned up
    assert (
        lion.output()
        .splitlines()[-1]
        .startswith(
            f"error: {run_dir}/checkpoints holds checkpoints of an optimizer.name 'adamw' run "
            "(newest step 2) and this recipe's optimizer.name is 'lion', whose optimizer state is "
            "another: set optimizer.name=adamw to resume it, or a new run_dir "
        )
    ), lion.output()[-3000:]
    changed = ("train.steps=4", "train.batch_size=16", "optimizer.lr=1e-3")
    output = TrainerPod(str(run_dir), 1, tmp_path, changed).finish()
    assert (
        "trainer: settings changed since the run last started, from step 2 on it trains with "
        "the new ones: train.steps 2 -> 4, train.batch_size 8 -> 16, optimizer.lr 0.003 -> 0.001\n"
    ) in output


def test_a_resume_that_cannot_write_its_run_dir_ends_in_one_line_with_its_status(
    small_disk, tmp_path
):
    """On a full disk, the resume crashed rewriting checkpoints/model.json (a traceback,
    exit 1); on a read-only one, opening trainer.lock did."""
    run_dir = small_disk.path / "run"
    cache = f"data.cache_dir={tmp_path / 'cache'}"  # the disk holds the run's own files only
    TrainerPod(str(run_dir), 1, tmp_path, ("train.steps=2", cache)).finish()
    record = (run_dir / "checkpoints" / "model.json").read_text()
    small_disk.fill()
    # model.dtype changes what model.json records, so the resume must write it
    full = TrainerPod(str(run_dir), 1, tmp_path, ("train.steps=4", cache, "model.dtype=bfloat16"))
    assert full.wait() == [EXIT_CHECKPOINT_IO], full.output()[-3000:]
    assert f"error: cannot write {run_dir}/checkpoints/model.json ([Errno 28] No space " in (
        full.output()
    )
    assert "Traceback" not in full.output()
    assert (run_dir / "checkpoints" / "model.json").read_text() == record
    small_disk.make_read_only()
    read_only = TrainerPod(str(run_dir), 1, tmp_path, ("train.steps=4", cache))
    assert read_only.wait() == [2]
    assert read_only.output().splitlines()[-1] == (
        f"error: run_dir {run_dir} cannot be written (Read-only file system): make it "
        "writable, or set another run_dir"
    )


def test_a_trainers_gs_lease_goes_with_its_sigterm_stop_and_once_taken_over_it_stops(gcs, tmp_path):
    """A gs:// run directory had no lock at all: a trainer started beside a live one, or after
    one presumed dead, trained on beside it. The lease's holder is named in it; a SIGTERM stop
    releases it, so the relaunch starts at once; a trainer paused past the lease's TTL (a
    stopped VM) finds it taken over and stops with one line, status 2."""
    run_dir, lock = "gs://test-bucket/runs/leased", "gs://test-bucket/runs/leased/trainer.lock"
    first = TrainerPod(run_dir, 1, tmp_path)
    first.wait_for_step(1)
    record = json.loads(io.read_bytes(lock))
    assert (record["pid"], record["run_id"]) == (first.procs[0].pid, "tiny")
    stopped = first.stop_at(2, signal.SIGTERM)
    assert io.read_with_generation(lock) is None
    second = TrainerPod(run_dir, 1, tmp_path)
    second.wait_for_step(stopped + 1)
    assert "leased to" not in second.output()  # nothing to wait out
    second.procs[0].send_signal(signal.SIGSTOP)
    try:
        with run_lock.hold(run_dir, "taker"):  # waits out the TTL, then takes it over
            second.procs[0].send_signal(signal.SIGCONT)
            assert second.wait() == [2], second.output()[-3000:]
    finally:
        second.procs[0].send_signal(signal.SIGCONT)
    assert (
        second.output()
        .splitlines()[-1]
        .startswith(f"error: run_dir {run_dir}'s lease was taken over by pid {os.getpid()} on ")
    ), second.output()[-3000:]


def test_a_second_trainer_on_a_run_dir_in_use_stops_and_leaves_the_first_alone(tmp_path):
    """Both trained side by side, each saving its steps over the other's checkpoints and
    deleting the other's saves in progress, and both exited 0."""
    reference, run_dir = str(tmp_path / "reference"), tmp_path / "run"
    TrainerPod(reference, 1, tmp_path).finish()
    first = TrainerPod(str(run_dir), 1, tmp_path)
    first.wait_for_step(5)
    first.procs[0].send_signal(signal.SIGSTOP)  # alive, holding the run dir, writing nothing
    try:
        wait_for(lambda: stopped(first.procs[0].pid), what="the first trainer to stop")
        files = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
        second = TrainerPod(str(run_dir), 1, tmp_path, ("optimizer.lr=1e-2",))
        assert second.wait() == [2]
        pid = first.procs[0].pid
        assert f"error: run_dir {run_dir} is in use by another trainer (pid {pid} on " in (
            second.output()
        ), second.output()[-3000:]
        assert PROGRESS.search(second.output()) is None
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == files
    finally:
        first.procs[0].send_signal(signal.SIGCONT)
    first.finish()
    _check_resumed_run_matches(reference, str(run_dir), [])
