"""`train.profile_steps: [start, end]`: a jax.profiler trace of those steps in
{run_dir}/profile (TensorBoard / XProf format: plugins/profile/RUN/HOST.xplane.pb).

Process 0 traces (its host and its devices); on a gs:// run directory the trace is written
to a temporary directory, since the profiler writes local files, uploaded when it stops and
then removed.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import jax

from trainer import io


class StepTrace:
    """Starts tracing when the loop reaches step `start` and stops at step `end` (so it holds
    the updates start+1 to end), or when the loop ends first. Without `steps`, does nothing."""

    def __init__(self, run_dir: str, steps: list[int]):
        self.steps = steps
        self.destination = io.join(run_dir, "profile")
        self.tracing = False
        self.local_dir = self.destination

    def at_step(self, step: int, state: Any, done: bool = False) -> None:
        """Call before each step with the step count so far, and with `done` after the loop."""
        if not self.steps:
            return
        start, end = self.steps
        if not self.tracing and step == start and not done:
            if io.is_gcs(self.destination):
                self.local_dir = tempfile.mkdtemp(prefix="trainer-profile-")
            jax.profiler.start_trace(self.local_dir)
            self.tracing = True
        elif self.tracing and (step >= end or done):
            jax.block_until_ready(state)  # the traced steps' device work, not just its dispatch
            jax.profiler.stop_trace()
            self.tracing = False
            if self.local_dir != self.destination:
                io.copy_tree(self.local_dir, self.destination)
                shutil.rmtree(self.local_dir)
            print(f"trainer: profile of steps {start + 1}-{step} in {self.destination}", flush=True)
