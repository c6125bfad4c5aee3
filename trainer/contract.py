"""What the trainer and tpuctl agree on beyond the TPUCTL_* variables: the exit statuses of
`python -m trainer` that tpuctl tells apart, and the mark tpuctl puts on a finished run's DONE
record when it launches the run again.

`tpuctl babysit` imports them, so this module imports nothing: the CLI reads it without the
trainer's dependencies (`pip install tpuctl` brings neither jax nor fsspec).
"""

# Bad input: a recipe, its files or the environment, in one `error:` line (trainer.__main__);
# launched again, the same recipe fails the same way. So does a run_dir that another trainer
# holds, found so at the start or when it took this one's gs:// lease over (trainer.run_lock).
EXIT_BAD_INPUT = 2
# Another process of the pod died, or never joined it (sysexits' EX_UNAVAILABLE): the failure
# is that process's, and a relaunch may well succeed.
EXIT_PEER_LOST = 69
# The loss or gradient norm of a step was not finite (sysexits' EX_DATAERR): the run stopped
# before saving that step's state, and a relaunch with the same settings diverges again.
EXIT_DIVERGED = 65
# The training loop made no progress for train.stall_timeout_s (sysexits' EX_SOFTWARE): every
# process showed its threads' stacks; a relaunch resumes from the newest checkpoint.
EXIT_STALLED = 70
# A checkpoint could not be written or read (sysexits' EX_IOERR): storage trouble, or a save
# that hung; a relaunch resumes from the newest checkpoint that committed.
EXIT_CHECKPOINT_IO = 74
# Stopped on SIGTERM (a preemption notice, `tpuctl kill`) with nothing lost: its checkpoint
# committed, or it had not trained yet (sysexits' EX_TEMPFAIL). A clean stop to resume, not a
# failure.
EXIT_PREEMPTED = 75

# A key of the DONE record (`{run_dir}/DONE`) that `tpuctl run` adds, with the new launch's run
# id as its value, when it launches a finished run again without knowing whether that launch
# goes on (train.epochs: its steps come from the token cache): until the trainer has seen the
# run finished and removed the key (or removed DONE to go on), the record is no launch's end.
DONE_PENDING = "pending_launch"
