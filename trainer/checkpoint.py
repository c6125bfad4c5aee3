"""Durable train state: orbax checkpoints in `{run_dir}/checkpoints`, local or on gs://.

- Sharded: every process writes and reads only its own shards; restoring onto another mesh
  (saved on fsdp=8, resumed on fsdp=4) reshards on the fly.
- Committed-only: orbax finalizes a step directory last (atomic rename locally, a commit file
  on GCS); resume takes the newest committed step and never a half-written one.
- Agreed decisions: whether to save at a step is a pure function of the step (every_steps,
  milestone_every) plus two flags agreed on by all processes: "SIGTERM arrived" (on any
  process) and "the time-based interval elapsed" (process 0's clock only), exchanged in a
  tiny all-gather each step when there are several processes.
- Bounded: a save that has not committed within `save_timeout_s` ends the process with
  `EXIT_SAVE_TIMEOUT` and a one-line error, instead of stalling the run for hours.
- Preemption: the first SIGTERM makes the next `maybe_save` write the current step, wait for
  it to commit and return True; the trainer then exits with `EXIT_PREEMPTED`. A second
  SIGTERM terminates at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from trainer import io
from trainer.config import CheckpointConfig, ModelConfig, TrainerError

# Distinct exit statuses, so tpuctl can tell "saved and stopped on SIGTERM" (resume it) and
# "a checkpoint save hung" from a crash. 75 and 74 are sysexits' EX_TEMPFAIL and EX_IOERR.
EXIT_PREEMPTED = 75
EXIT_SAVE_TIMEOUT = 74

_WATCHDOG_POLL_S = 0.2
MODEL_INFO_FILE = "model.json"  # beside the step directories: what export needs to know


class CheckpointError(TrainerError):
    """A checkpoint is missing or cannot be used; the message says which one and what to do."""


class Checkpointer:
    """Saves and restores the train state in `directory` according to `cfg`.

    Every process must create it and call `restore`, `maybe_save`, `save` and `close` at the
    same points of the loop: orbax coordinates the processes inside these calls.
    """

    def __init__(
        self,
        directory: str,
        cfg: CheckpointConfig,
        *,
        model: ModelConfig | None = None,
        tokenizer_path: str | None = None,
    ):
        """`model` and `tokenizer_path`, when given, are recorded beside the checkpoints so that
        `python -m trainer.export` can rebuild a Hugging Face directory from the run alone."""
        directory = io.absolute(directory)
        io.makedirs(directory)
        if model is not None and jax.process_index() == 0:
            info = {"model": dataclasses.asdict(model), "tokenizer": tokenizer_path}
            io.write_text(io.join(directory, MODEL_INFO_FILE), json.dumps(info, indent=1) + "\n")
        self.directory = directory
        self.cfg = cfg
        self._manager = ocp.CheckpointManager(directory, options=self._options(cfg))
        self._last_save_time = time.monotonic()
        self._sigterm = threading.Event()
        self._previous_sigterm_handler = None
        self._install_sigterm_handler()
        self._save_started: float | None = None  # set while a save may still be uncommitted
        self._saving_step: int | None = None
        self._in_blocking_save = False
        self._watchdog: threading.Thread | None = None

    @staticmethod
    def _options(cfg: CheckpointConfig) -> ocp.CheckpointManagerOptions:
        policies = [checkpoint_managers.LatestN(cfg.keep if cfg.keep > 0 else None)]
        if cfg.milestone_every:
            policies.append(checkpoint_managers.EveryNSteps(cfg.milestone_every))
        return ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_save,
            async_options=ocp.AsyncOptions(timeout_secs=max(1, int(cfg.save_timeout_s))),
            # Leftovers of saves cut short (uncommitted, unusable) would collide with new saves.
            cleanup_tmp_directories=True,
            create=True,
        )

    # -- restore -----------------------------------------------------------------------------

    @property
    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._manager.latest_step()

    def restore(self, abstract_state: Any) -> Any | None:
        """The newest committed checkpoint, placed on the shardings of `abstract_state` (a pytree
        of jax.ShapeDtypeStruct with shardings, e.g. from jax.eval_shape). None only when the
        directory holds no committed checkpoint; one that cannot be loaded raises CheckpointError.
        """
        step = self.latest_step
        if step is None:
            return None
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be loaded ({_first_line(e)}); "
                "run with the model config it was saved with, or move that step directory "
                "away to resume from an earlier one (it was not treated as 'no checkpoint')"
            ) from e
        self._last_save_time = time.monotonic()
        if jax.process_index() == 0:
            print(f"trainer: resuming from checkpoint step {step} in {self.directory}", flush=True)
        return state

    # -- save --------------------------------------------------------------------------------

    def maybe_save(self, state: Any, step: int | None = None) -> bool:
        """Save `state` if this step is due; True when the loop should stop (SIGTERM arrived on
        some process, and the state is now committed). Pass the loop's `step` (state.step)
        to spare reading it from the devices, which would wait for the step to finish."""
        step = _host_step(state) if step is None else step
        stop, time_due = self._agreed_flags()
        if stop or time_due or self._due_by_step(step):
            self.save(state, step)
        if stop:
            self.wait_until_committed()
        return stop

    def _due_by_step(self, step: int) -> bool:
        every, milestone = self.cfg.every_steps, self.cfg.milestone_every
        if step == 0:  # the initial state is reproducible from the recipe
            return False
        return bool((every and step % every == 0) or (milestone and step % milestone == 0))

    def _agreed_flags(self) -> tuple[bool, bool]:
        """(SIGTERM seen by any process, process 0's time-based interval elapsed), the same on
        every process."""
        minutes = self.cfg.every_minutes
        time_due = bool(minutes) and time.monotonic() - self._last_save_time >= minutes * 60
        if jax.process_count() == 1:
            return self._sigterm.is_set(), time_due
        from jax.experimental import multihost_utils

        local = np.array([self._sigterm.is_set(), time_due], dtype=np.int32)
        flags = np.asarray(multihost_utils.process_allgather(local))
        return bool(flags[:, 0].any()), bool(flags[0, 1])

    def save(self, state: Any, step: int | None = None) -> None:
        """Start saving `state` at its step (unless that step is already saved). Asynchronous
        when `cfg.async_save`: it returns once the arrays are copied off the devices."""
        step = _host_step(state) if step is None else step
        self._last_save_time = time.monotonic()
        if step in self._manager.all_steps():
            return
        self._start_watchdog()
        self._in_blocking_save = True
        self._save_started, self._saving_step = time.monotonic(), step
        try:
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        finally:
            self._in_blocking_save = False

    def wait_until_committed(self) -> None:
        """Block until the pending save (if any) is committed; raises its error if it failed."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        """Wait for pending saves, then release orbax's threads and the SIGTERM handler."""
        self.wait_until_committed()
        self._manager.close()
        self._save_started = None
        if self._previous_sigterm_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
            self._previous_sigterm_handler = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- SIGTERM and the save watchdog -----------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def on_sigterm(signum, frame):
            if self._sigterm.is_set():  # a second SIGTERM: stop now
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            self._sigterm.set()

        self._previous_sigterm_handler = signal.signal(signal.SIGTERM, on_sigterm)

    @property
    def sigterm_received(self) -> bool:
        """True once this process got SIGTERM."""
        return self._sigterm.is_set()

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch_saves, name="checkpoint-watchdog", daemon=True
            )
            self._watchdog.start()

    def _watch_saves(self) -> None:
        """End the process if a save stays uncommitted past `save_timeout_s`: a hung async write
        to GCS would otherwise block the next save (and the run) indefinitely, and orbax's
        non-daemon save thread would keep even a failed process alive."""
        while True:
            time.sleep(_WATCHDOG_POLL_S)
            started = self._save_started
            if started is None:
                continue
            if not self._in_blocking_save and not self._manager.is_saving_in_progress():
                if self._save_started == started:
                    self._save_started = None
                continue
            if time.monotonic() - started > self.cfg.save_timeout_s:
                print(
                    f"error: checkpoint save of step {self._saving_step} to {self.directory} did "
                    f"not commit within checkpoint.save_timeout_s={self.cfg.save_timeout_s:g} s; "
                    "exiting so the run restarts from the last committed checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_SAVE_TIMEOUT)


def _host_step(state: Any) -> int:
    return int(jax.device_get(state.step))


# -- parameters-only reads (export, serving) --------------------------------------------------


def read_model_info(directory: str) -> tuple[ModelConfig, str | None]:
    """The ModelConfig and tokenizer path a Checkpointer recorded in `directory`."""
    path = io.join(directory, MODEL_INFO_FILE)
    if not io.exists(path):
        raise CheckpointError(
            f"{path} not found: this run did not record its model config; pass --recipe RECIPE"
        )
    info = json.loads(io.read_text(path))
    return ModelConfig(**info["model"]), info.get("tokenizer")


def load_params(directory: str, step: int | None = None) -> tuple[int, Any]:
    """(step, params) of a committed checkpoint (default: the newest) as numpy arrays on this
    host, whatever mesh saved them; the optimizer state is not read."""
    directory = io.absolute(directory)
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    manager = ocp.CheckpointManager(directory, options=options)
    steps = manager.all_steps()
    manager.close()
    if not steps:
        raise CheckpointError(f"no committed checkpoint in {directory}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(
            f"--step {step}: no committed checkpoint at that step in {directory}; "
            f"committed steps: {', '.join(map(str, sorted(steps)))}"
        )
    item_dir = io.join(directory, str(step), "default")
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(item_dir).item_metadata.tree
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])

        def on_host(meta):
            return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=cpu)

        def skipped(meta):
            return ocp.PLACEHOLDER

        wanted = {
            key: jax.tree.map(on_host if key == "params" else skipped, subtree)
            for key, subtree in tree.items()
        }
        restore_args = jax.tree.map(
            lambda x: (
                ocp.PLACEHOLDER if x is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(sharding=cpu)
            ),
            wanted,
        )
        restored = checkpointer.restore(
            item_dir, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args)
        )
    except Exception as e:
        raise CheckpointError(
            f"checkpoint step {step} in {directory} cannot be read: {_first_line(e)}"
        ) from e
    return step, jax.tree.map(np.asarray, restored["params"])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
