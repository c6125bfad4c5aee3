"""Recovery benchmark: what a preemption costs a run that `tpuctl babysit` looks after.

On a local pod (v4-16: 2 jax.distributed trainer processes on the CPU), the real CLI
babysits the tiny recipe while this script preempts the pod `--preemptions` times, each
once the run has logged a few new steps. For every preemption it reports, from the
babysitter's own state file:

- detect: seconds from the preemption to the babysitter noticing it (bounded by --poll);
- recreate: the provider's delete + create (the API's time, subtracted below);
- relaunch: seconds from the preemption to the trainer processes started again;
- resume: seconds from the preemption to the first new step logged (this includes the
  trainer's own start-up: imports, data, restoring the checkpoint, compiling the step);
- overhead = resume - recreate, and steps lost (target: at most the checkpoint interval).

    .venv/bin/python benchmarks/recovery.py [--preemptions 3] [--json recovery.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_load import after_run, before_run

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT_EVERY = 4
STEPS_BETWEEN = 6  # new steps logged before each preemption


def overrides(steps: int, run_dir: Path) -> list[str]:
    return [
        f"train.steps={steps}", "train.batch_size=8", "train.seq_len=64",
        "train.grad_accum=1", "logging.every_steps=1", "eval.every_steps=0",
        f"checkpoint.every_steps={CHECKPOINT_EVERY}", "checkpoint.keep=2", f"run_dir={run_dir}",
    ]  # fmt: skip


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return [json.loads(line)["step"] for line in lines]


def wait_for_new_steps(run_dir: Path, seen: int, count: int, proc: subprocess.Popen) -> None:
    while len(logged_steps(run_dir)) < seen + count:
        if proc.poll() is not None:
            raise SystemExit(f"babysit exited early ({proc.returncode})")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preemptions", type=int, default=3)
    parser.add_argument("--poll", default="1")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--compile-cache", choices=["true", "false"], default="true",
        help="train.compile_cache: false compiles the step again at every relaunch",
    )  # fmt: skip
    args = parser.parse_args()
    load_before = before_run()

    root = Path(tempfile.mkdtemp(prefix="tpuctl-recovery-"))
    env = {**os.environ, "XDG_CONFIG_HOME": str(root / "config"), "TPUCTL_PROVIDER": "local"}
    env.update(XDG_STATE_HOME=str(root / "state"))
    env.pop("STORAGE_EMULATOR_HOST", None)
    os.environ.update(XDG_STATE_HOME=env["XDG_STATE_HOME"])  # LocalProvider below finds the pod
    from tpuctl.providers.local import LocalProvider

    run_dir = root / "run"
    steps = STEPS_BETWEEN * (args.preemptions + 1) + CHECKPOINT_EVERY
    command = [
        sys.executable, "-m", "tpuctl", "babysit", "v4-16", str(REPO / "recipes" / "tiny.yaml"),
        "--name", "bench", "--run-id", "recovery", "--poll", args.poll, "--delete-when-done",
        "--", *overrides(steps, run_dir), f"train.compile_cache={args.compile_cache}",
    ]  # fmt: skip
    with open(root / "babysit.out", "w") as out:
        proc = subprocess.Popen(command, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
        injected = []
        for _ in range(args.preemptions):
            wait_for_new_steps(run_dir, len(logged_steps(run_dir)), STEPS_BETWEEN, proc)
            injected.append(time.time())
            LocalProvider().preempt("bench")
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"babysit failed; see {root / 'babysit.out'}")
    state = json.loads((root / "state" / "tpuctl" / "babysit" / "recovery.json").read_text())
    rows = []
    for at, event in zip(injected, state["events"], strict=True):
        since = event["at"] - at  # detection lag: the event's times count from detection
        rows.append(
            {
                "detect_s": since,
                "recreate_s": event["recreate_s"],
                "relaunch_s": since + event["relaunched_s"],
                "resume_s": since + event["resumed_s"],
                "overhead_s": since + event["resumed_s"] - event["recreate_s"],
                "steps_lost": event["steps_lost"],
            }
        )
    for i, row in enumerate(rows, 1):
        print(f"preemption {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    summary = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    summary["max_steps_lost"] = max(row["steps_lost"] for row in rows)
    summary["checkpoint_every"] = CHECKPOINT_EVERY
    summary["load_average_before"] = load_before[0]
    summary["load_average_after"] = after_run()[0]
    print("median: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    if args.json:
        args.json.write_text(json.dumps({"preemptions": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
