"""Durable train state: orbax checkpoints in `{run_dir}/checkpoints`, local or on gs://.

- Sharded: every process writes and reads only its own shards; restoring onto another mesh
  (saved on fsdp=8, resumed on fsdp=4) reshards on the fly.
- Committed-only: orbax finalizes a step directory last (atomic rename locally, a commit file
  on GCS); resume takes the newest committed step and never a half-written one.
- Agreed decisions: whether to save at a step is a pure function of the step (every_steps,
  milestone_every) plus two flags agreed on by all processes: "SIGTERM arrived" (on any
  process) and "the time-based interval elapsed" (process 0's clock only), exchanged in a
  tiny all-gather each step when there are several processes.
- Fail-stop: a save that fails (in any process, in the background or in the call) or has not
  committed within `save_timeout_s` ends every process of the run within seconds with
  `EXIT_CHECKPOINT_IO` and one line `error: checkpoint save of step N failed on process P:
  CAUSE`, instead of training on without checkpoints or stalling in the next save. orbax
  only logs a failed background save; a log handler turns that record into the failure.
- Preemption: once the run trains, the first SIGTERM (`trainer.preemption`) makes the next
  `maybe_save` write the current step, wait for it to commit and return True; the trainer
  then exits with `EXIT_PREEMPTED`. A second SIGTERM terminates at once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from trainer import io, preemption
from trainer.config import CheckpointConfig, ModelConfig
from trainer.contract import EXIT_BAD_INPUT, EXIT_CHECKPOINT_IO
from trainer.distributed import fail_everywhere, first_line
from trainer.resume import (  # what a resume refuses, jax-free: `tpuctl run` refuses it too
    MODEL_INFO_FILE,
    CheckpointError,
    check_resumable,
    recorded_info,
    run_record,
)

_WATCHDOG_POLL_S = 0.2
# tensorstore appends its status payloads ([http_response_body='...']) to error messages.
_STATUS_PAYLOAD = re.compile(r"( \[\w+='.*)$")
# Beside the step directories too: the milestone steps saved so far, kept whatever a later
# recipe's milestone_every says (a resume under another setting must not delete them).
MILESTONES_FILE = "milestones.json"
# What the train state's arrays and tree depend on: the model config, and the optimizer
# settings that add or drop parts of its state (optimizer.name is refused before).
_STATE_SETTINGS = ("model.", "optimizer.clip_norm", "optimizer.weight_decay")


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
        objective: str | None = None,
        generation: dict | None = None,
        settings: dict[str, Any] | None = None,
    ):
        """`model`, `tokenizer_path`, `objective`, `generation` (trainer.generation.record) and
        `settings` (`resume_settings`), when given, are recorded beside the checkpoints so that
        `python -m trainer.export` can rebuild a Hugging Face directory from the run alone, and
        a resume is checked against them (`restore`). Beside committed checkpoints they are
        recorded only once `restore` has accepted them: a recipe that cannot resume the run
        must not rewrite what the run's checkpoints are."""
        directory = io.absolute(directory)
        try:
            io.makedirs(directory)
        except OSError as e:  # a file of that name, or no permission
            raise CheckpointError(
                f"cannot use {directory} for checkpoints ({e.strerror or e}): move what is "
                "there away, or pick another run_dir"
            ) from None
        self._info: dict | None = None
        if model is not None:
            self._info = run_record(model, tokenizer_path, objective, generation, settings)
        self.directory = directory
        self.cfg = cfg
        self._milestones = _recorded_milestones(directory)
        self._manager = ocp.CheckpointManager(
            directory, options=self._options(cfg, self._milestones)
        )
        self._last_save_time = time.monotonic()
        self._previous_sigterm_handler = preemption.watch()
        self._save_started: float | None = None  # set while a save may still be uncommitted
        self._saving_step: int | None = None
        self._in_blocking_save = False
        self._watchdog: threading.Thread | None = None
        self._save_errors = _SaveErrors(lambda: self._save_started is not None)
        _quiet_orbax_teardown()
        if self.latest_step is None:
            self._record_info()

    def _record_info(self) -> None:
        """Write the model record (process 0), unless it already says the same: every resume
        records it again, and one on a full disk or read-only storage must not fail on
        rewriting what is there. A write that fails is EXIT_CHECKPOINT_IO, as a failed save."""
        if self._info is None or jax.process_index() != 0:
            return
        text = json.dumps(self._info, indent=1) + "\n"
        path = io.join(self.directory, MODEL_INFO_FILE)
        if _read_or_none(path) == text:
            return
        try:
            io.write_text(path, text)
        except Exception as e:  # storage trouble of any kind: the path is ours, the text too
            raise CheckpointError(
                f"cannot write {path} ({first_line(e)}): free space there or make it writable, "
                "then start the run again",
                EXIT_CHECKPOINT_IO,
            ) from e

    def _record_milestone(self, step: int) -> None:
        every = self.cfg.milestone_every
        if not every or step % every or step in self._milestones:
            return
        self._milestones.append(step)
        if jax.process_index() == 0:
            text = json.dumps({"steps": sorted(self._milestones)}) + "\n"
            io.write_text(io.join(self.directory, MILESTONES_FILE), text)

    @staticmethod
    def _options(cfg: CheckpointConfig, milestones: list[int]) -> ocp.CheckpointManagerOptions:
        policies = [checkpoint_managers.LatestN(cfg.keep if cfg.keep > 0 else None)]
        if cfg.milestone_every:
            policies.append(checkpoint_managers.EveryNSteps(cfg.milestone_every))
        if milestones:  # saved under an earlier recipe's milestone_every
            policies.append(checkpoint_managers.CustomSteps(milestones))
        return ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_save,
            # The save watchdog ends a save that outlives save_timeout_s, in a line naming the
            # setting; orbax's own timeout only backs it up (under load it fired first, with
            # "ChainedFuture completed 0/3 futures"). orbax takes a C int of seconds: 2**31 - 1
            # (68 years) is "no limit" already.
            async_options=ocp.AsyncOptions(
                timeout_secs=min(2 * max(1, int(cfg.save_timeout_s)) + 30, 2**31 - 1)
            ),
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
        self._await_cleanup()
        step = self.latest_step
        if step is None:
            return None
        recorded = recorded_info(self.directory) or {}
        check_resumable(self.directory, self._info or {}, recorded, step)
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:
            status = restore_failure_status(e)
            raise CheckpointError(self._unloadable(step, e, status, recorded), status) from e
        self._last_save_time = time.monotonic()
        self._record_info()
        if jax.process_index() == 0:
            print(f"trainer: resuming from checkpoint step {step} in {self.directory}", flush=True)
            if changes := self._changes(recorded):
                changed = ", ".join(f"{key} {theirs} -> {ours}" for key, theirs, ours in changes)
                print(f"trainer: settings changed since the run last started, from step {step} "
                      f"on it trains with the new ones: {changed}", flush=True)  # fmt: skip
        return state

    def _unloadable(self, step: int, error: Exception, status: int, recorded: dict) -> str:
        """The line for checkpoint `step` failing to load with `error`: what to do about it,
        naming the settings the saved arrays depend on in which this recipe differs from the
        run's record."""
        changes = [c for c in self._changes(recorded) if c[0].startswith(_STATE_SETTINGS)]
        if status != EXIT_BAD_INPUT:
            advice = "storage failed to read it: start the run again to retry"
        elif changes:
            differ = ", ".join(
                f"{key} {ours} (the run's: {theirs})" for key, theirs, ours in changes
            )
            advice = f"this recipe has {differ}: run with the run's settings"
        else:
            advice = "run with the model config and optimizer settings it was saved with"
        return (
            f"checkpoint step {step} in {self.directory} cannot be loaded ({first_line(error)}); "
            f"{advice}, or move that step directory away to resume from an earlier one (it "
            "was not treated as 'no checkpoint')"
        )

    def _changes(self, recorded: dict) -> list[tuple[str, str, str]]:
        """(key, the run's value, this recipe's) of each model config field and resume
        setting that differs from the run's record (model.init_from is refused instead)."""
        ours, theirs = _settings_of(self._info or {}), _settings_of(recorded)
        keys = [k for k in ours if k in theirs and k != "model.init_from"]
        return [(k, _shown(theirs[k]), _shown(ours[k])) for k in keys if ours[k] != theirs[k]]

    # -- save --------------------------------------------------------------------------------

    def maybe_save(
        self,
        state: Any,
        step: int | None = None,
        before_save: Callable[[], None] | None = None,
    ) -> bool:
        """Save `state` if this step is due; True when the loop should stop (SIGTERM arrived on
        some process, and the state is now committed). Pass the loop's `step` (state.step)
        to spare reading it from the devices, which would wait for the step to finish.
        `before_save` runs (on every process) only when the state is about to be saved, and
        may raise to keep it from being saved: the loop's check that the step was finite,
        which may wait for the step then, since the save waits for it anyway."""
        step = _host_step(state) if step is None else step
        self._stop_if_failed()  # never train on past a save that failed
        stop, time_due = self._agreed_flags()
        if stop or time_due or self._due_by_step(step):
            if before_save is not None:
                before_save()
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
            return preemption.received(), time_due
        from jax.experimental import multihost_utils

        local = np.array([preemption.received(), time_due], dtype=np.int32)
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
        self._record_milestone(step)
        self.wait_until_committed()  # orbax would wait too; a failure is the previous step's
        self._in_blocking_save = True
        self._save_started, self._saving_step = time.monotonic(), step
        try:
            self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except Exception as e:
            self._fail(self._save_errors.first() or e)
        finally:
            self._in_blocking_save = False
        self._stop_if_failed()

    def wait_until_committed(self) -> None:
        """Block until the pending save (if any) is committed; a failed one ends the run."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            self._fail(self._save_errors.first() or e)
        self._stop_if_failed()

    def _stop_if_failed(self) -> None:
        if error := self._save_errors.first():
            self._fail(error)

    def _fail(self, cause: BaseException | str) -> None:
        """End every process: this process's save of the current step failed."""
        cause = cause if isinstance(cause, str) else first_line(cause)
        cause = _STATUS_PAYLOAD.sub("", cause)
        fail_everywhere(
            f"checkpoint save of step {self._saving_step} failed on process "
            f"{jax.process_index()}: {cause}",
            EXIT_CHECKPOINT_IO,
        )

    def close(self) -> None:
        """Wait for pending saves, then release orbax's threads and the SIGTERM handler."""
        self.wait_until_committed()
        self._await_cleanup()
        self._manager.close()
        self._save_errors.close()
        self._save_started = None
        preemption.unwatch(self._previous_sigterm_handler)
        self._previous_sigterm_handler = None

    def _await_cleanup(self) -> None:
        """Wait until orbax has removed the saves earlier runs left unfinished. Its
        CheckpointManager starts that in a thread of its own as it opens and waits for it
        only before its first save, not in close(): a process that ended before (a resume
        refused, a run already finished) had that thread's traceback ("cannot schedule new
        futures after shutdown") printed after its own last line. No public call waits for
        it; a clean-up that failed fails the next save instead, where orbax waits for it."""
        wait = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if wait is not None:
            with contextlib.suppress(Exception):
                wait()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the save watchdog -------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch_saves, name="checkpoint-watchdog", daemon=True
            )
            self._watchdog.start()

    def _watch_saves(self) -> None:
        """End the run when a background save fails, or stays uncommitted past
        `save_timeout_s`: a hung async write to GCS would otherwise block the next save (and
        the run) indefinitely, and orbax's non-daemon save thread would keep even a failed
        process alive."""
        while True:
            time.sleep(_WATCHDOG_POLL_S)
            self._stop_if_failed()
            started = self._save_started
            if started is None:
                continue
            if not self._in_blocking_save and not self._manager.is_saving_in_progress():
                if self._save_started == started:
                    self._save_started = None
                continue
            if time.monotonic() - started > self.cfg.save_timeout_s:
                self._fail(
                    f"it did not commit to {self.directory} within "
                    f"checkpoint.save_timeout_s={self.cfg.save_timeout_s:g} s"
                )


class _SaveErrors(logging.Filter):
    """Catches the errors orbax only logs while a save is in flight (its background threads
    log the exception and carry on) and keeps their tracebacks out of the log: the run
    reports them in one line instead. `saving()` says whether a save may be in flight."""

    def __init__(self, saving: Callable[[], bool]):
        super().__init__()
        self._saving = saving
        self._errors: list[BaseException] = []
        self._logger = logging.getLogger("absl")  # orbax logs through absl
        self._logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if (
            error is not None
            and record.levelno >= logging.ERROR
            and f"{os.sep}orbax{os.sep}" in record.pathname
            and self._saving()
        ):
            self._errors.append(error)
            return False
        return True

    def first(self) -> BaseException | None:
        """The first save error caught, if any."""
        return self._errors[0] if self._errors else None

    def close(self) -> None:
        self._logger.removeFilter(self)


def _quiet_orbax_teardown() -> None:
    """Drop the echoes of an orbax operation that already failed (and was reported): when one
    read or write of a batch fails, orbax closes its event loop while tensorstore still
    completes the others, and each one then prints "Event loop is closed" or "coroutine
    ignored GeneratorExit" as an unraisable exception, hundreds of tracebacks in all."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_orbax", False):
        return

    def hook(unraisable) -> None:
        error, obj = unraisable.exc_value, unraisable.object
        loop_closed = isinstance(error, RuntimeError) and "Event loop is closed" in str(error)
        orbax_coroutine = inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename
        if not (loop_closed or orbax_coroutine):
            previous(unraisable)

    hook.quiets_orbax = True
    sys.unraisablehook = hook


def _host_step(state: Any) -> int:
    return int(jax.device_get(state.step))


# -- parameters-only reads (export, serving) --------------------------------------------------


# Storage trouble that may pass, as tensorstore (status names) and HTTP clients word it.
_TRANSIENT = re.compile(
    r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|Service Unavailable|"
    r"Too Many Requests|timed out)\b",
    re.IGNORECASE,
)


def restore_failure_status(error: BaseException) -> int:
    """The exit status of a run whose checkpoint failed to load with `error`:
    EXIT_CHECKPOINT_IO when the error, or one it came from, is an OS or network error or
    storage trouble that may pass (so `tpuctl babysit` relaunches), else EXIT_BAD_INPUT (a
    checkpoint of another model fails alike on every launch)."""
    chain: BaseException | None = error
    for _ in range(16):  # a chain that loops back on itself ends here
        if chain is None:
            break
        if isinstance(chain, OSError) or _TRANSIENT.search(str(chain)):
            return EXIT_CHECKPOINT_IO
        chain = chain.__cause__ or chain.__context__
    return EXIT_BAD_INPUT


def read_model_info(directory: str) -> tuple[ModelConfig, str | None]:
    """The ModelConfig and tokenizer path a Checkpointer recorded in `directory`."""
    info = recorded_info(directory)
    if info is None:
        raise CheckpointError(
            f"{io.join(directory, MODEL_INFO_FILE)} not found: this run did not record its "
            "model config; pass --recipe RECIPE"
        )
    return ModelConfig(**info["model"]), info.get("tokenizer")


def read_generation_info(directory: str) -> dict:
    """The generation settings a Checkpointer recorded in `directory` (trainer.generation);
    empty for a run that recorded none."""
    generation = (recorded_info(directory) or {}).get("generation")
    return generation if isinstance(generation, dict) else {}


def _recorded_milestones(directory: str) -> list[int]:
    """The milestone steps recorded in `directory` (none when the record is missing or
    unreadable: the recipe's milestone_every still keeps its own)."""
    path = io.join(directory, MILESTONES_FILE)
    try:
        steps = json.loads(io.read_text(path))["steps"] if io.exists(path) else []
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [s for s in steps if isinstance(s, int)] if isinstance(steps, list) else []


def _settings_of(info: dict) -> dict[str, Any]:
    """A model record's model config (`model.KEY`) and resume settings, by dotted key."""
    model = {f"model.{key}": value for key, value in info.get("model", {}).items()}
    return model | info.get("settings", {})


def _shown(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def _read_or_none(path: str) -> str | None:
    """The text of `path`; None when it is missing or cannot be read (then it gets written)."""
    try:
        return io.read_text(path) if io.exists(path) else None
    except Exception:  # unreadable for whatever reason: writing it again is the remedy
        return None


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
            f"checkpoint step {step} in {directory} cannot be read: {first_line(e)}"
        ) from e
    return step, jax.tree.map(np.asarray, restored["params"])
