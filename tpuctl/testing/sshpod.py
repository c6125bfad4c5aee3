"""A pod of real OpenSSH hosts on this machine, for tests and benchmarks (needs root).

Each host is one `sshd` in its own network namespace (a veth on a bridge this pod creates,
with an address in 10.231.0.0/16), its own mount namespace (a private /tmp and /root) and
its own PID namespace (its `ps` shows only its processes; stopping the host ends them all).
Where namespaces are not allowed, hosts fall back to sshd on distinct 127.0.x.y addresses.

    pod = SshPod(4, key=(private_key_path, public_key_line)).start()
    pod.hosts            # ["10.231.7.10", ...]
    pod.stop_host(2)     # host 2 goes away: connections are refused
    pod.stop()           # namespaces, veths, bridge, sshd: all gone

Every name starts with `tpf<owner pid>`, so leftovers of a crashed run are recognised (their
owner is dead) and removed by the next pod, while a concurrently running pod is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PREFIX = "tpf"
SUBNET = "10.231"  # a /16 used only by these pods; each pod takes one /24 of it
LOCK_FILE = "/run/lock/tpuctl-sshpod.lock"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
START_DEADLINE_S = 20.0
PRIVATE_ROOTS = ("/root/", "/tmp/")  # each host mounts its own over these
POD_DIRS = "/var/tmp"  # not /tmp: each host mounts its own /tmp over the real one
DIR_PREFIX = "tpuctl-sshpod-"

ALT_PORT = 2222  # every host also listens here: for tests of a per-host ssh_config Port
SSHD_CONFIG = """\
Port 22
Port {alt_port}
ListenAddress {address}
HostKey {host_key}
PidFile none
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AuthorizedKeysFile {authorized_keys}
StrictModes no
MaxStartups 500
MaxSessions 100
UseDNS no
PrintMotd no
"""
SFTP_SUBSYSTEM = "Subsystem sftp internal-sftp\n"
# What `python3=` replaces on the hosts: every python3 / python3.N on sshd's PATH.
SYSTEM_PYTHONS = ("/usr/local/bin/python3*", "/usr/bin/python3*")


@dataclass
class _Host:
    index: int
    address: str
    directory: Path
    namespace: str | None
    process: subprocess.Popen | None = None


_pods_made = itertools.count()


def _next_pod_letter() -> str:
    """Tells apart the pods of one process within the 15 characters an interface name has."""
    return "abcdefghijklmnopqrstuvwxyz"[next(_pods_made) % 26]


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def _alive(pid: int) -> bool:
    """Whether a pod's owner still runs (a killed owner may linger as a zombie)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


class SshPod:
    """`n` sshd hosts accepting root logins with `key` = (private key path, public key line).

    `keep_visible` lists paths under /root or /tmp of this machine that hosts still see
    through their private /root and /tmp (e.g. the checkout and Python installation a test
    runs on the workers). `python3` makes that interpreter every `python3` and `python3.N`
    on the hosts' PATH (a stock TPU VM's 3.10, say); `sftp=False` leaves out sshd's SFTP
    subsystem, as minimal images do (`python3` needs namespaces)."""

    def __init__(
        self,
        n: int,
        key: tuple[str, str],
        keep_visible: tuple[str, ...] = (),
        *,
        python3: str | None = None,
        sftp: bool = True,
    ) -> None:
        if n < 1 or n > 200:
            raise ValueError("an SshPod has 1 to 200 hosts")
        self.n = n
        self.python3 = python3
        self.sftp = sftp
        self.private_key, self.public_key = key
        self.keep_visible = tuple(str(Path(p)) for p in keep_visible)
        if any(not p.startswith(PRIVATE_ROOTS) for p in self.keep_visible):
            raise ValueError("keep_visible paths must lie under /root or /tmp")
        self.tag = f"{PREFIX}{os.getpid()}{_next_pod_letter()}"
        self.bridge = f"{self.tag}b"
        self.directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{self.tag}-", dir=POD_DIRS))
        self.isolated = True  # False: the 127.0.x.y fallback
        self.octet: int | None = None  # isolated pods: hosts are 10.231.<octet>.10+i
        self._hosts: list[_Host] = []

    @property
    def gateway(self) -> str:
        """This machine's address as the hosts reach it (services tests run for them)."""
        return f"{SUBNET}.{self.octet}.1" if self.isolated else "127.0.0.1"

    @property
    def hosts(self) -> list[str]:
        """The hosts' IP addresses, in index order."""
        return [host.address for host in self._hosts]

    def start(self) -> SshPod:
        """Start every host and wait until each accepts TCP connections."""
        if os.geteuid() != 0:
            raise PermissionError("an SshPod needs root (network namespaces, sshd as root)")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        try:
            with _exclusive_lock():
                clean_leftovers()
                self.isolated = self._try_bridge()
            self._hosts = [self._prepare_host(i) for i in range(self.n)]
            self._write_hosts_file()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(self._launch, self._hosts))
            self._wait_until_listening(range(self.n))
        except BaseException:
            self.stop()
            raise
        return self

    def silence_host(self, index: int, silent: bool = True) -> None:
        """Cut (or restore) a host's link: its sshd keeps running but nothing reaches it,
        like a VM that hangs or drops packets, so connections time out instead of failing."""
        if not self.isolated:
            raise RuntimeError("silencing a host needs network namespaces")
        _sh("ip", "link", "set", f"{self.tag}v{index}", "down" if silent else "up")

    def hide_host(self, index: int, hidden: bool = True) -> None:
        """Make a host unreachable from this machine (or reachable again) while the pod's
        other hosts still reach it: a VM without an external IP, behind a bastion. Its
        replies to this machine's address are dropped, so connections from here time out."""
        if not self.isolated:
            raise RuntimeError("hiding a host needs network namespaces")
        verb = "add" if hidden else "del"
        namespace = self._hosts[index].namespace
        _sh("ip", "-n", str(namespace), "route", verb, "blackhole", f"{self.gateway}/32")

    def forget_connections(self, index: int) -> None:
        """The host forgets every connection to its sshd without telling the other end (a
        reboot, a reset NAT): its sockets are destroyed while its replies to this machine are
        dropped, so a client learns only from the reset its next packet gets."""
        self.hide_host(index)
        try:
            namespace = str(self._hosts[index].namespace)
            _sh(
                "ip",
                "netns",
                "exec",
                namespace,
                "ss",
                "-K",
                "state",
                "established",
                "sport",
                "= :22",
            )
        finally:
            self.hide_host(index, hidden=False)

    def log(self, index: int) -> str:
        """What a host's sshd has logged (one line per login: "Accepted publickey ...")."""
        return (self._hosts[index].directory / "sshd.log").read_text(errors="replace")

    def stop_host(self, index: int) -> None:
        """Take one host down: its sshd and every process it started end; connections to
        its address are refused from now on."""
        host = self._hosts[index]
        if host.process is not None and host.process.poll() is None:
            _kill_tree(host.process)
        host.process = None

    def start_host(self, index: int) -> None:
        """Bring a stopped host back (same address, same files, same host key)."""
        host = self._hosts[index]
        if host.process is None:
            self._launch(host)
            self._wait_until_listening([index])

    def set_max_sessions(self, index: int, sessions: int) -> None:
        """Restart a host whose sshd allows `sessions` sessions per connection (OpenSSH's
        default is 10; the pod's hosts start with 100)."""
        config = self._hosts[index].directory / "sshd_config"
        lines = [ln for ln in config.read_text().splitlines() if not ln.startswith("MaxSessions")]
        config.write_text("\n".join([*lines, f"MaxSessions {sessions}"]) + "\n")
        self.stop_host(index)
        self.start_host(index)

    def set_host_keys(
        self, index: int, key_types: tuple[str, ...] = ("ed25519",), fresh: bool = False
    ) -> None:
        """Restart a host at the same address with host keys of `key_types`, keeping the
        ones it has of those types unless `fresh` (a recreated VM has all new keys; a man
        in the middle offers keys of other types)."""
        host = self._hosts[index]
        self.stop_host(index)
        for old in host.directory.glob("ssh_host_*_key*"):
            kind = old.name.removeprefix("ssh_host_").split("_key")[0]
            if fresh or kind not in key_types:
                old.unlink()
        keys = [
            path if (path := host.directory / f"ssh_host_{kind}_key").exists()
            else self._host_key(host.directory, kind, f"h{index}")
            for kind in key_types
        ]  # fmt: skip
        config = host.directory / "sshd_config"
        lines = [line for line in config.read_text().splitlines() if not line.startswith("HostKey")]
        config.write_text("\n".join([*lines, *(f"HostKey {key}" for key in keys)]) + "\n")
        self.start_host(index)

    @staticmethod
    def _host_key(directory: Path, kind: str, comment: str) -> Path:
        path = directory / f"ssh_host_{kind}_key"
        _sh("ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path))
        return path

    def processes(self, index: int) -> list[str]:
        """Command lines of the processes running on one host (its sshd's descendants)."""
        host = self._hosts[index]
        if host.process is None:
            return []
        return [_cmdline(pid) for pid in _descendants(host.process.pid)]

    def cpu_seconds(self) -> float:
        """CPU time the hosts have used so far: every sshd, its sessions and the commands
        they ran, finished ones included (each counts in the parent that reaped it)."""
        children = _children()
        roots = [h.process.pid for h in self._hosts if h.process is not None]
        pids = [*roots, *(p for root in roots for p in _descendants(root, children))]
        return sum(cpu_seconds(pid) for pid in pids)

    def path(self, index: int, inside: str) -> Path:
        """Where a host's private /tmp or /root path lives on this machine."""
        for root in ("/tmp", "/root"):
            if inside == root or inside.startswith(root + "/"):
                return self._hosts[index].directory / root.strip("/") / inside[len(root) + 1 :]
        raise ValueError(f"{inside} is not under a host's private /tmp or /root")

    def stop(self) -> None:
        """Stop every sshd and remove the namespaces, veths, bridge and files. Idempotent."""
        for index in range(len(self._hosts)):
            self.stop_host(index)
        for host in self._hosts:
            if host.namespace:
                _sh("ip", "netns", "del", host.namespace, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        for host in self._hosts:
            if not self.isolated:
                _sh("ip", "addr", "del", f"{host.address}/32", "dev", "lo", check=False)
        self._hosts = []
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SshPod:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- setup -----------------------------------------------------------------

    def _try_bridge(self) -> bool:
        """Create this pod's bridge on a free /24; False when namespaces are not allowed."""
        probe = f"{self.tag}probe"
        if _sh("ip", "netns", "add", probe, check=False).returncode != 0:
            return False
        _sh("ip", "netns", "del", probe, check=False)
        self.octet = _free_octet()
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{SUBNET}.{self.octet}.1/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        return True

    def _prepare_host(self, index: int) -> _Host:
        directory = self.directory / f"h{index}"
        (directory / "tmp").mkdir(parents=True)
        os.chmod(directory / "tmp", 0o1777)
        ssh_dir = directory / "root" / ".ssh"
        ssh_dir.mkdir(parents=True, mode=0o700)
        (ssh_dir / "authorized_keys").write_text(self.public_key.strip() + "\n")
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        host_key = self._host_key(directory, "ed25519", f"h{index}")
        if self.isolated:
            address, namespace = f"{SUBNET}.{self.octet}.{10 + index}", f"{self.tag}-h{index}"
            self._wire_namespace(namespace, index, address)
        else:
            address, namespace = f"127.0.{1 + index // 250}.{2 + index % 250}", None
        # Without a mount namespace the host has no /root of its own: point sshd at the file.
        authorized_keys = ".ssh/authorized_keys" if namespace else ssh_dir / "authorized_keys"
        (directory / "sshd_config").write_text(
            SSHD_CONFIG.format(
                address=address,
                alt_port=ALT_PORT,
                host_key=host_key,
                authorized_keys=authorized_keys,
            )
            + SFTP_SUBSYSTEM * self.sftp
        )
        if self.python3:
            wrapper = directory / "python3"
            wrapper.write_text(f'#!/bin/sh\nexec {self.python3} "$@"\n')
            os.chmod(wrapper, 0o755)
        return _Host(index, address, directory, namespace)

    def _write_hosts_file(self) -> None:
        # Each host has its own hostname (h0, h1, ...) resolving to its own address, as on
        # real VMs: gloo (jax's CPU collectives) advertises the address its hostname has.
        lines = ["127.0.0.1 localhost", *(f"{h.address} h{h.index}" for h in self._hosts)]
        (self.directory / "hosts").write_text("\n".join(lines) + "\n")

    def _wire_namespace(self, namespace: str, index: int, address: str) -> None:
        veth = f"{self.tag}v{index}"
        _sh("ip", "netns", "add", namespace)
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _sh("ip", "link", "set", veth, "master", self.bridge, "up")
        batch = f"addr add {address}/24 dev eth0\nlink set eth0 up\nlink set lo up\n"
        subprocess.run(["ip", "-n", namespace, "-batch", "-"], input=batch, text=True, check=True)

    def _launch(self, host: _Host) -> None:
        sshd = f"{SSHD} -D -e -r -f {host.directory}/sshd_config"
        log = open(host.directory / "sshd.log", "ab")  # noqa: SIM115 (outlives this call)
        if host.namespace:
            home = host.directory / "root"
            shared = "".join(
                f"mkdir -p {self.path(host.index, path)} && "
                f"mount --bind {path} {self.path(host.index, path)} && "
                for path in self.keep_visible
            )
            pythons = (
                f"for p in {' '.join(SYSTEM_PYTHONS)}; do case $p in *[0-9]) "
                f"mount --bind {host.directory}/python3 $p;; esac; done && "
                if self.python3
                else ""
            )
            binds = (
                f"{shared}{pythons}hostname h{host.index} && "
                f"mount --bind {self.directory}/hosts /etc/hosts && "
                f"mount --rbind {host.directory}/tmp /tmp && "
                f"mount --rbind {home} /root && exec {sshd}"
            )
            argv = [
                "ip", "netns", "exec", host.namespace,
                "unshare", "--mount", "--uts", "--propagation", "private",
                "--pid", "--fork", "--mount-proc", "--kill-child",
                "sh", "-c", binds,
            ]  # fmt: skip
        else:
            _sh("ip", "addr", "add", f"{host.address}/32", "dev", "lo", check=False)
            argv = ["sh", "-c", f"exec {sshd}"]
        host.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()

    def _wait_until_listening(self, indexes) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        for index in indexes:
            host = self._hosts[index]
            while not _accepts(host.address):
                if host.process is None or host.process.poll() is not None:
                    log = (host.directory / "sshd.log").read_text(errors="replace")
                    raise RuntimeError(f"sshd for host {index} exited: {log[-500:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sshd for host {index} at {host.address} never listened")
                time.sleep(0.02)


def clean_leftovers() -> None:
    """Remove namespaces, bridges, sshd processes and files of pods whose owner is gone."""
    for namespace in _sh("ip", "netns", "list", check=False).stdout.split():
        owner = _owner(namespace)
        if owner is not None and not _alive(owner):
            for pid in _sh("ip", "netns", "pids", namespace, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _sh("ip", "netns", "del", namespace, check=False)
    for directory in Path(POD_DIRS).glob(f"{DIR_PREFIX}{PREFIX}*"):
        owner = _owner(directory.name.removeprefix(DIR_PREFIX))
        if owner is not None and not _alive(owner):
            shutil.rmtree(directory, ignore_errors=True)
    links = _sh("ip", "-o", "link", "show", "type", "bridge", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        owner = _owner(name)
        if owner is not None and not _alive(owner):
            _sh("ip", "link", "del", name, check=False)


def _owner(name: str) -> int | None:
    if not name.startswith(PREFIX):
        return None
    digits = ""
    for char in name[len(PREFIX) :]:
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else None


def _free_octet() -> int:
    used = _sh("ip", "-o", "-4", "addr", "show", check=False).stdout
    for octet in range(1, 255):
        if f" {SUBNET}.{octet}." not in used:
            return octet
    raise RuntimeError(f"no free /24 left in {SUBNET}.0.0/16")


@contextlib.contextmanager
def _exclusive_lock():
    Path(LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _accepts(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=0.2):
            return True
    except OSError:
        return False


def _kill_tree(process: subprocess.Popen) -> None:
    """End a host all at once, like a machine losing power: the namespace's init (sshd)
    goes first, which makes the kernel kill everything inside together, so no session
    outlives its command long enough to report on it. The rest is for the fallback."""
    family = _descendants(process.pid)
    init = family[:1]  # `ip netns exec` execs unshare, whose only child is the init
    for pid in [*init, process.pid, *family[1:]]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=10)


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, ... (None once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and of its children it has reaped."""
    fields = _stat_fields(pid)
    ticks = sum(int(f) for f in fields[11:15]) if fields else 0  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)):
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _descendants(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    children = _children() if children is None else children
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def make_keypair(directory: Path) -> tuple[str, str]:
    """An ed25519 login key pair for a pod: (private key path, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = directory / "pod_key"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    os.chmod(private, 0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return str(private), public.decode() + " tpuctl-test-pod"


def main(argv: list[str] | None = None) -> None:
    """`python -m tpuctl.testing.sshpod --hosts 32`: a pod of sshd hosts behind a fake Cloud
    TPU API, to try the fan-out commands by hand. Prints the environment to export."""
    import argparse

    parser = argparse.ArgumentParser(description="A pod of sshd hosts behind a fake TPU API.")
    parser.add_argument(
        "--hosts", type=int, default=4, help="1, 2, 4, ... 128 (a v4 slice's hosts)"
    )
    parser.add_argument("--name", default="pod", help="the node's name in the fake API")
    args = parser.parse_args(argv)
    if args.hosts < 1 or args.hosts > 128 or args.hosts & (args.hosts - 1):
        parser.error("--hosts must be a power of two from 1 to 128")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up on kill, too
    work = Path(tempfile.mkdtemp(prefix="tpuctl-sshpod-demo-"))
    try:
        _demo(args.hosts, args.name, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _demo(n: int, name: str, work: Path) -> None:
    from tpuctl.testing.fake_tpu import FakeTpuApi

    key = make_keypair(work)
    with SshPod(n, key) as pod, FakeTpuApi() as api:
        api.add_node(
            name, f"v4-{8 * n}", project="demo", zone="us-central1-a", worker_ips=pod.hosts
        )
        print(f"# {n} sshd hosts ({pod.hosts[0]} ...) as node {name}; export:")
        print(f"export TPUCTL_TPU_API_ENDPOINT={api.url} TPUCTL_PROJECT=demo")
        print("export TPUCTL_ZONE=us-central1-a TPUCTL_SSH_USER=root")
        print(f"export TPUCTL_SSH_KEY={key[0]} XDG_STATE_HOME={work / 'state'}")
        print("# then: tpuctl exec -- hostname -I")
        print("# type `stop N` / `start N` here to take host N down or up; Ctrl-D ends the pod")
        _serve_commands(pod)


def _serve_commands(pod: SshPod) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        for line in sys.stdin:
            verb, _, index = line.strip().partition(" ")
            if verb in ("stop", "start") and index.isdigit() and int(index) < pod.n:
                (pod.stop_host if verb == "stop" else pod.start_host)(int(index))
                print(f"host {index} {'stopped' if verb == 'stop' else 'started'}", flush=True)
            elif line.strip():
                print(f"unknown command {line.strip()!r}: stop N | start N", flush=True)


if __name__ == "__main__":
    main()
