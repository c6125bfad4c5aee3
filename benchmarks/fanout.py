"""Fan-out benchmark: the whole `tpuctl exec NODE -- true` process against `pdsh -R ssh`.

On an SshPod (real sshd hosts in network namespaces; needs root), with the fake Cloud TPU
API handing out the hosts' addresses, it times the complete CLI process (Python start-up,
config, address cache, SSH handshakes, command, summary) at 1, 8 and 32 workers, and pdsh
on the same hosts with the same key. Every figure is the median of --runs runs after one
warm-up run (which fills tpuctl's address cache and known_hosts, as a user's first command
would); the runs of all six commands are interleaved so load on the machine hits each alike.

    sudo .venv/bin/python benchmarks/fanout.py [--runs 7] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tpuctl.testing.fake_tpu import FakeTpuApi
from tpuctl.testing.sshpod import SshPod, make_keypair

# worker count -> an accelerator type with that many hosts
SIZES = {1: "v3-8", 8: "v3-64", 32: "v3-256"}
PROJECT, ZONE = "bench-project", "us-central1-a"
PRIORITY = -10  # nice value for everything the benchmark starts
TARGET_VS_PDSH = 0.5
TARGET_VS_ONE_WORKER = 1.5


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def interleaved_medians(commands: dict[str, list[str]], env: dict[str, str], runs: int):
    """Median wall time of each command. Rounds alternate between all commands, so a
    burst of load on the machine hits every figure alike rather than one of them."""
    for argv in commands.values():
        timed(argv, env)  # warm-up: address cache, known_hosts, page cache
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            samples[name].append(timed(argv, env))
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark starts sshd hosts in network namespaces: run it as root")
    if not shutil.which("pdsh"):
        sys.exit("pdsh is not installed (apt-get install pdsh)")

    # Every process of the benchmark (sshd hosts, tpuctl, pdsh) inherits this priority, so
    # on a shared machine the figures measure the tools more than the neighbours' load.
    os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)
    work = Path(tempfile.mkdtemp(prefix="tpuctl-bench-"))
    key = make_keypair(work)
    with SshPod(max(SIZES), key) as pod, FakeTpuApi() as api:
        for count, accelerator in SIZES.items():
            api.add_node(
                f"bench{count}", accelerator, project=PROJECT, zone=ZONE,
                worker_ips=pod.hosts[:count],
            )  # fmt: skip
        env = {
            **os.environ,
            "TPUCTL_TPU_API_ENDPOINT": api.url,
            "TPUCTL_PROJECT": PROJECT,
            "TPUCTL_ZONE": ZONE,
            "TPUCTL_SSH_KEY": key[0],
            "TPUCTL_SSH_USER": "root",
            "XDG_CONFIG_HOME": str(work / "config"),
            "XDG_STATE_HOME": str(work / "state"),
            "PDSH_SSH_ARGS_APPEND": (
                f"-i {key[0]} -o BatchMode=yes -o StrictHostKeyChecking=accept-new "
                f"-o UserKnownHostsFile={work / 'pdsh_known_hosts'}"
            ),
        }
        commands = {}
        for count in SIZES:
            hosts = ",".join(pod.hosts[:count])
            commands[f"tpuctl-{count}"] = [sys.executable, "-m", "tpuctl", "exec", f"bench{count}", "--", "true"]  # fmt: skip
            commands[f"pdsh-{count}"] = ["pdsh", "-R", "ssh", "-l", "root", "-f", "64", "-w", hosts, "true"]  # fmt: skip
        medians = interleaved_medians(commands, env, args.runs)
    figures = {
        count: {"tpuctl_s": medians[f"tpuctl-{count}"], "pdsh_s": medians[f"pdsh-{count}"]}
        for count in SIZES
    }
    for count, figure in figures.items():
        print(
            f"{count:>3} workers: tpuctl {figure['tpuctl_s']:.3f} s, pdsh {figure['pdsh_s']:.3f} s"
        )
    shutil.rmtree(work, ignore_errors=True)

    vs_pdsh = figures[32]["tpuctl_s"] / figures[32]["pdsh_s"]
    vs_one = figures[32]["tpuctl_s"] / figures[1]["tpuctl_s"]
    print(f"32 workers: tpuctl/pdsh = {vs_pdsh:.2f} (target <= {TARGET_VS_PDSH})")
    print(f"tpuctl 32 workers / 1 worker = {vs_one:.2f} (target <= {TARGET_VS_ONE_WORKER})")
    result = {
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "nice": PRIORITY,
        "workers": {str(k): v for k, v in figures.items()},
        "ratio_tpuctl_vs_pdsh_32": vs_pdsh,
        "ratio_tpuctl_32_vs_1": vs_one,
        "targets_met": vs_pdsh <= TARGET_VS_PDSH and vs_one <= TARGET_VS_ONE_WORKER,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
