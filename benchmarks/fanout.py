"""Fan-out benchmark: the whole `tpuctl exec NODE -- true` process, cold and warm, against
`pdsh -R ssh`, and how each grows with the number of workers.

On an SshPod (real sshd hosts in network namespaces; needs root), with the fake Cloud TPU
API handing out the hosts' addresses, it times the complete CLI process (Python start-up,
config, address cache, SSH, command, summary) at 1, 8, 32 and 128 workers three ways:
cold (`ssh.reuse off`: a key exchange per worker), warm (through the node's connection
holder, which the warm-up run leaves behind) and pdsh on the same hosts with the same key;
plus `tpuctl exec` on a 512-worker local pod (processes, no SSH), and `tpuctl put` of a
1 MiB file cold and warm (no peer: pdcp needs itself installed on every host). Every figure
is the median
of --runs runs after warm-up runs (which fill tpuctl's address cache and known_hosts, as a
user's first command would, and start the holders); the runs of all commands are
interleaved so load on the machine hits each alike. Python's bytecode cache is on for the
tpuctl runs, as for an installed package.

    sudo .venv/bin/python benchmarks/fanout.py [--runs 7] [--sizes 1,8,32,128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

from machine_load import after_run, before_run

from tpuctl.fanout import holder
from tpuctl.testing.fake_tpu import FakeTpuApi
from tpuctl.testing.sshpod import SshPod, cpu_seconds, make_keypair

# worker count -> an accelerator type with that many hosts
SSH_SIZES = {1: "v3-8", 8: "v3-64", 32: "v3-256", 128: "v3-1024"}
LOCAL_SIZE, LOCAL_TYPE = 512, "v4-4096"
PROJECT, ZONE = "bench-project", "us-central1-a"
PRIORITY = -10  # nice value for everything the benchmark starts
TARGET_COLD_VS_PDSH = 0.3  # at 32 workers
TARGET_WARM_VS_PDSH = 0.1  # at 32 workers
TARGET_WARM_GROWTH = 2.0  # warm at 128 workers / warm at 1 worker
PUT_BYTES = 1 << 20  # the file `tpuctl put` copies


@dataclass(frozen=True)
class Sample:
    """One run of a command: its wall time and the CPU it cost, split by where it ran."""

    wall: float
    client_cpu: float  # the command's own process tree (tpuctl or pdsh and its ssh)
    holder_cpu: float  # tpuctl's connection holders (warm runs do their SSH work there)
    hosts_cpu: float  # every sshd host of the pod: handshakes, sessions, the command


def holders_cpu() -> float:
    pids = [e for e in os.listdir("/proc") if e.isdigit()]
    return sum(cpu_seconds(int(pid)) for pid in pids if b"tpuctl.fanout.holder" in _cmdline(pid))


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def timed(argv: list[str], env: dict[str, str], pod: SshPod) -> Sample:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    hosts, holders = pod.cpu_seconds(), holders_cpu()
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Sample(wall, client, holders_cpu() - holders, pod.cpu_seconds() - hosts)


def interleaved_medians(commands: dict[str, tuple[list[str], dict[str, str]]], rounds: int, pod):
    """Median wall time and CPU of each command. Rounds alternate between all commands,
    so a burst of load on the machine hits every figure alike rather than one of them."""
    samples: dict[str, list[Sample]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, (argv, env) in commands.items():
            samples[name].append(timed(argv, env, pod))
    return {
        name: Sample(*map(statistics.median, zip(*map(astuple, runs), strict=True)))
        for name, runs in samples.items()
    }


def warm_up(commands: dict[str, tuple[list[str], dict[str, str]]], holders: Path, count, pod):
    """One run of each command, then every warm node's holder listening and connected."""
    for argv, env in commands.values():
        timed(argv, env, pod)
    deadline = time.monotonic() + 300
    while len(list(holders.glob("*.sock"))) < count:
        if time.monotonic() > deadline:
            sys.exit(f"only {len(list(holders.glob('*.sock')))} of {count} holders started")
        time.sleep(0.2)
    for name, (argv, env) in commands.items():
        if name.startswith(("warm-", "putwarm-")):
            timed(argv, env, pod)  # waits for the holder's connections, if still making them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--sizes", default="1,8,32,128", help="sshd worker counts to time")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if os.geteuid() != 0:
        sys.exit("the benchmark starts sshd hosts in network namespaces: run it as root")
    if not shutil.which("pdsh"):
        sys.exit("pdsh is not installed (apt-get install pdsh)")
    if unknown := [s for s in sizes if s not in SSH_SIZES]:
        sys.exit(f"--sizes {unknown}: choose from {list(SSH_SIZES)}")

    # Every process of the benchmark (sshd hosts, tpuctl, pdsh) inherits this priority, so
    # on a shared machine the figures measure the tools more than the neighbours' load.
    os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)
    load_before = before_run()
    work = Path(tempfile.mkdtemp(prefix="tpuctl-bench-"))  # short: holders' socket paths
    key = make_keypair(work)
    base = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
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
    tpuctl = [sys.executable, "-m", "tpuctl"]
    local = {**base, "TPUCTL_PROVIDER": "local"}
    subprocess.run([*tpuctl, "up", LOCAL_TYPE, "--local", "--name", "local512"], env=local,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    holders = work / "state" / "tpuctl" / "holders"
    payload = work / "payload"
    payload.write_bytes(os.urandom(PUT_BYTES))
    try:
        with SshPod(max(sizes), key) as pod, FakeTpuApi() as api:
            base["TPUCTL_TPU_API_ENDPOINT"] = api.url
            commands: dict[str, tuple[list[str], dict[str, str]]] = {}
            for count in sizes:
                api.add_node(
                    f"bench{count}", SSH_SIZES[count], project=PROJECT, zone=ZONE,
                    worker_ips=pod.hosts[:count],
                )  # fmt: skip
                exec_true = [*tpuctl, "exec", f"bench{count}", "--", "true"]
                commands[f"cold-{count}"] = (exec_true, {**base, "TPUCTL_SSH_REUSE": "off"})
                commands[f"warm-{count}"] = (exec_true, {**base, "TPUCTL_SSH_REUSE": "10m"})
                put = [
                    *tpuctl,
                    "put",
                    "-n",
                    f"bench{count}",
                    str(payload),
                    "/tmp/tpuctl-bench-payload",
                ]
                commands[f"putcold-{count}"] = (put, {**base, "TPUCTL_SSH_REUSE": "off"})
                commands[f"putwarm-{count}"] = (put, {**base, "TPUCTL_SSH_REUSE": "10m"})
                hosts = ",".join(pod.hosts[:count])
                pdsh = ["pdsh", "-R", "ssh", "-l", "root", "-f", "64", "-w", hosts, "true"]
                commands[f"pdsh-{count}"] = (pdsh, base)
            commands[f"local-{LOCAL_SIZE}"] = ([*tpuctl, "exec", "local512", "--", "true"], local)
            warm_up(commands, holders, len(sizes), pod)
            medians = interleaved_medians(commands, args.runs, pod)
            for path in holders.glob("*.sock"):
                holder.tell_to_exit(path)
    finally:
        subprocess.run([*tpuctl, "down", "local512", "--yes"], env=local,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    report(args, sizes, medians, load_before)


def report(args, sizes: list[int], medians: dict[str, Sample], load_before) -> None:
    walls = {
        count: {k: medians[f"{k}-{count}"].wall for k in ("cold", "warm", "pdsh")}
        for count in sizes
    }
    first = walls[sizes[0]]
    load_after = after_run()
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (its own hosts)")
    for count, f in walls.items():
        print(
            f"{count:>4} workers: cold {f['cold']:.3f} s ({f['cold'] / f['pdsh']:.2f}x pdsh, "
            f"{f['cold'] / first['cold']:.2f}x 1 worker), warm {f['warm']:.3f} s "
            f"({f['warm'] / f['pdsh']:.2f}x pdsh, {f['warm'] / first['warm']:.2f}x 1 worker), "
            f"pdsh {f['pdsh']:.3f} s"
        )
    print("CPU seconds per command (medians): the command's own / tpuctl's holder / the hosts'")
    for count in sizes:
        cpu = {k: medians[f"{k}-{count}"] for k in ("cold", "warm", "pdsh")}
        print(f"{count:>4} workers: " + ", ".join(
            f"{k} {c.client_cpu:.2f} / {c.holder_cpu:.2f} / {c.hosts_cpu:.2f}" for k, c in cpu.items()
        ))  # fmt: skip
    local = medians[f"local-{LOCAL_SIZE}"].wall
    print(f"{LOCAL_SIZE:>4} local workers: {local:.3f} s")
    puts = {
        count: {k: medians[f"put{k}-{count}"].wall for k in ("cold", "warm")} for count in sizes
    }
    for count, f in puts.items():
        print(f"{count:>4} workers: put of {PUT_BYTES >> 20} MiB cold {f['cold']:.3f} s, "
              f"warm {f['warm']:.3f} s ({f['warm'] / f['cold']:.2f}x cold)")  # fmt: skip
    targets = {}
    if 32 in walls:
        targets["cold_vs_pdsh_32"] = (walls[32]["cold"] / walls[32]["pdsh"], TARGET_COLD_VS_PDSH)
        targets["warm_vs_pdsh_32"] = (walls[32]["warm"] / walls[32]["pdsh"], TARGET_WARM_VS_PDSH)
    if 128 in walls and 1 in walls:
        targets["warm_128_vs_1"] = (walls[128]["warm"] / walls[1]["warm"], TARGET_WARM_GROWTH)
    for name, (value, target) in targets.items():
        print(f"{name} = {value:.2f} (target <= {target})")
    result = {
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "nice": PRIORITY,
        "workers": {str(k): v for k, v in walls.items()},
        "cpu_s": {name: asdict(sample) for name, sample in medians.items()},
        f"local_{LOCAL_SIZE}_s": local,
        "put_s": {str(k): v for k, v in puts.items()},
        "ratios": {name: value for name, (value, _) in targets.items()},
        "targets_met": all(value <= target for value, target in targets.values()),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
