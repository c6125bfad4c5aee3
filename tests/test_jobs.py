"""Job scripts on local-transport workers: launch, status, logs, kill, refusals, secrets."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from polling import wait_for

from tpuctl import jobs
from tpuctl.errors import TpuctlError
from tpuctl.fanout import Host

# A stand-in job that behaves like the trainer where it matters here: it prints progress,
# saves and exits 0 on SIGTERM, and worker 2 can be told to crash with a traceback.
JOB = r"""
import os, signal, sys, time
def on_term(*_):
    print("SIGTERM: saved checkpoint", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
steps = int(os.environ.get("STEPS", "3"))
for step in range(steps):
    print(f"step {step} secret_len={len(os.environ.get('SECRET_TOKEN', ''))}", flush=True)
    if os.environ.get("CRASH_ON") == os.environ["TPUCTL_PROCESS_ID"] and step == 1:
        raise RuntimeError("worker crashed")
    time.sleep(float(os.environ.get("STEP_S", "0.1")))
print("finished", flush=True)
"""


@pytest.fixture
def hosts(tmp_path):
    made = []
    for index in range(3):
        workdir = tmp_path / f"w{index}"
        workdir.mkdir()
        made.append(
            Host(
                label=f"w{index:02d}",
                address="localhost",
                workdir=str(workdir),
                transport="local",
                env={"TPUCTL_PROCESS_ID": str(index)},
            )
        )
    yield made
    jobs.kill(made, grace=1)  # never leave a job behind, whatever the test did


def spec(run_id="r1", **env):
    return jobs.JobSpec(run_id=run_id, command=[sys.executable, "-c", JOB], env=env)


def wait_until_stepping(hosts):
    """Until every worker's job printed a step: its SIGTERM handler is installed by then."""
    wait_for(lambda: all(j.last_line.startswith("step") for j in jobs.status(hosts)))


def states(hosts):
    return [job.state for job in jobs.status(hosts)]


def collect_logs(hosts, **options):
    lines = []
    jobs.logs(hosts, on_line=lambda host, _s, line: lines.append((host.label, line)), **options)
    return lines


def test_run_follow_to_the_end_then_status_shows_exit_codes(hosts):
    jobs.launch(hosts, spec())
    lines = collect_logs(hosts, follow=True)  # returns by itself once every worker exited
    assert ("w00", "finished") in lines
    assert all(label == "w00" for label, _ in lines)  # others: errors only, and none
    report = jobs.status(hosts)
    assert [j.state for j in report] == ["exited"] * 3
    assert [j.exit_code for j in report] == [0, 0, 0]
    assert all(j.run_id == "r1" and j.last_line == "finished" for j in report)


def test_crashing_worker_shows_in_status_and_default_logs(hosts):
    jobs.launch(hosts, spec(CRASH_ON="2"))
    lines = collect_logs(hosts, follow=True)
    crashed = [line for label, line in lines if label == "w02"]
    assert any("Traceback" in line for line in crashed)
    assert any("RuntimeError: worker crashed" in line for line in crashed)
    assert not any(line.startswith("step") for line in crashed)  # progress is filtered
    assert not any(label == "w01" for label, _ in lines)
    report = jobs.status(hosts)
    assert report[2].state == "exited" and report[2].exit_code == 1
    assert report[2].last_line == "tpuctl: job failed with exit status 1"
    assert crashed[-1] == "tpuctl: job failed with exit status 1"
    assert report[0].exit_code == 0


def test_all_lines_shows_every_worker(hosts):
    jobs.launch(hosts, spec())
    wait_for(lambda: states(hosts) == ["exited"] * 3)
    lines = collect_logs(hosts, all_lines=True, lines=1)
    assert sorted(lines) == [("w00", "finished"), ("w01", "finished"), ("w02", "finished")]


# What a jax.distributed trainer's log looks like on a CPU pod (gloo) and a TPU VM (absl).
CHATTY = r"""
print("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
print("I0000 00:00:1732000000.123456    4242 cpu_client.cc:467] TfrtCpuClient created.")
for rank in range(3):
    print(f"[Gloo] Rank {rank} is connected to 15 peer ranks. Expected number of connected peer ranks is : 15")
print("[Gloo] Rank [Gloo] Rank 5 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7")
print("4 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7")
print("step 10  loss 2.5000", flush=True)
print("[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1")
"""


def test_runtime_chatter_stays_out_of_logs_and_ps_unless_raw(hosts):
    jobs.launch(hosts, jobs.JobSpec("chat", [sys.executable, "-c", CHATTY]))
    followed = collect_logs(hosts, follow=True, all_lines=True)
    assert sorted(followed) == [(h.label, "step 10  loss 2.5000") for h in hosts]
    assert [j.last_line for j in jobs.status(hosts)] == ["step 10  loss 2.5000"] * 3
    assert [line for _, line in collect_logs(hosts[:1])] == ["step 10  loss 2.5000"]
    raw = [line for _, line in collect_logs(hosts[:1], raw=True)]
    assert len(raw) == 9 and sum("[Gloo]" in line for line in raw) == 5


def test_second_run_refused_while_one_runs_and_force_replaces_it(hosts):
    jobs.launch(hosts, spec(STEPS="1000"))
    wait_until_stepping(hosts)
    with pytest.raises(jobs.JobBusy, match="run r1 is still running on w00, w01, w02"):
        jobs.launch(hosts, spec(run_id="r2"))
    assert states(hosts) == ["running"] * 3
    jobs.launch(hosts, jobs.JobSpec("r2", [sys.executable, "-c", JOB], {"STEPS": "1"}, force=True))
    wait_for(lambda: states(hosts) == ["exited"] * 3)
    old = jobs.status(hosts, run_id="r1")
    assert [j.exit_code for j in old] == [0, 0, 0]  # r1 got SIGTERM and saved
    assert [j.run_id for j in jobs.status(hosts)] == ["r2"] * 3


def trainer_pids(marker):
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(int(proc.name))
    return found


def test_kill_sigterms_so_the_job_saves_and_leaves_no_process(hosts):
    jobs.launch(hosts, spec(STEPS="1000"))
    wait_until_stepping(hosts)
    reports = jobs.kill(hosts, grace=10)
    assert [(r.run_id, r.signal) for r in reports] == [("r1", "SIGTERM")] * 3
    assert trainer_pids("secret_len") == []
    assert [j.exit_code for j in jobs.status(hosts)] == [0, 0, 0]
    assert collect_logs(hosts[:1], lines=2) == [
        ("w00", "SIGTERM: saved checkpoint"),
        ("w00", "tpuctl: job stopped by tpuctl (exit status 0)"),
    ]
    again = jobs.kill(hosts)  # nothing running: not an error
    assert [r.run_id for r in again] == [None] * 3


def test_a_kill_for_one_run_leaves_another_run_running(hosts):
    """babysit stops only its own run: one a user started meanwhile keeps running."""
    jobs.launch(hosts, spec("theirs", STEPS="1000"))
    wait_until_stepping(hosts)
    reports = jobs.kill(hosts, grace=10, only="mine")
    assert [(r.run_id, r.other_run) for r in reports] == [(None, "theirs")] * 3
    assert states(hosts) == ["running"] * 3
    assert [r.run_id for r in jobs.kill(hosts, grace=10, only="theirs")] == ["theirs"] * 3


def test_a_process_that_got_an_ended_jobs_pid_is_neither_the_run_nor_killed(hosts):
    """Pids are reused: long after a job ended, its recorded group id can be another
    program's, which kill used to SIGTERM and ps showed as the run."""
    jobs.launch(hosts[:1], spec(STEPS="1"))
    wait_for(lambda: states(hosts[:1]) == ["exited"])
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        run_dir = Path(hosts[0].workdir) / ".tpuctl" / "jobs" / "r1"
        (run_dir / "pid").write_text(f"{bystander.pid}\n")  # as if the pid came round again
        assert states(hosts[:1]) == ["exited"]
        assert [r.run_id for r in jobs.kill(hosts[:1], grace=1)] == [None]
        assert bystander.poll() is None, "kill stopped a process that is not the job"
        jobs.launch(hosts[:1], spec("r2", STEPS="1"))  # not refused as busy
    finally:
        bystander.kill()
        bystander.wait()


def test_kill_escalates_to_sigkill_after_the_grace_period(hosts):
    jobs.launch(hosts[:1], spec(STEPS="1000", IGNORE_TERM="1"))
    wait_for(lambda: collect_logs(hosts[:1]))
    started = time.monotonic()
    (report,) = jobs.kill(hosts[:1], grace=0.5)
    assert report.signal == "SIGKILL"
    assert time.monotonic() - started < 10
    assert trainer_pids("secret_len") == []
    assert jobs.status(hosts[:1])[0].exit_code == 137


def test_secrets_reach_the_job_but_not_process_arguments(hosts):
    secret = "s3cr3t-value-for-test"
    jobs.launch(hosts, spec(STEPS="1000", SECRET_TOKEN=secret))
    wait_until_stepping(hosts)
    listing = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert "secret_len" in listing  # the job is in the listing ...
    assert secret not in listing  # ... without the secret
    assert all(j.last_line.endswith(f"secret_len={len(secret)}") for j in jobs.status(hosts))
    jobs.kill(hosts, grace=10)
    logged = "".join(line for _, line in collect_logs(hosts, all_lines=True))
    assert secret not in logged


def holds(pid, path):
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fd) == str(path) for fd in fds.iterdir())


def test_stale_lockfile_is_cleared_but_a_holder_refuses_launch_until_force(hosts):
    host = hosts[0]
    lockfile = Path(host.workdir) / "tmp" / "libtpu_lockfile"
    lockfile.parent.mkdir(exist_ok=True)
    lockfile.write_text("")
    jobs.launch([host], spec(STEPS="1"))
    assert not lockfile.exists()
    wait_for(lambda: states([host]) == ["exited"])

    lockfile.write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(lockfile)!r}); import time; time.sleep(600)"]
    )
    try:
        wait_for(lambda: holds(holder.pid, lockfile))
        with pytest.raises(jobs.JobBusy, match=f"pids {holder.pid}"):
            jobs.launch([host], spec(run_id="r2"))
        (report,) = jobs.kill([host], grace=5, force=True)
        assert report.holders and report.holders[0].startswith(f"{holder.pid} python")
        assert holder.wait(timeout=10) != 0
        assert not lockfile.exists()
    finally:
        holder.kill()
        holder.wait()


def test_stopped_jobs_say_so_in_their_log_instead_of_failing(hosts):
    jobs.launch(hosts[:1], spec(STEPS="1000"))
    wait_until_stepping(hosts[:1])
    jobs.kill(hosts[:1], grace=10)
    assert collect_logs(hosts[:1], lines=1) == [
        ("w00", "tpuctl: job stopped by tpuctl (exit status 0)")
    ]
    jobs.launch(hosts[:1], spec(run_id="r2", STEPS="1000", IGNORE_TERM="1"))
    wait_until_stepping(hosts[:1])
    jobs.kill(hosts[:1], grace=0.3)
    assert collect_logs(hosts[:1], lines=1) == [("w00", "tpuctl: job stopped by tpuctl (SIGKILL)")]


def test_tail_follows_a_log_that_is_replaced_and_ends_with_the_job(hosts):
    replace_log = (
        "echo first; sleep 0.5; mv .tpuctl/jobs/r1/log .tpuctl/jobs/r1/log.rotated; "
        "echo second >> .tpuctl/jobs/r1/log; sleep 1.5"
    )
    jobs.launch(hosts[:1], jobs.JobSpec("r1", ["bash", "-c", replace_log]))
    lines = collect_logs(hosts[:1], follow=True)
    assert [line for _, line in lines] == ["first", "second"]


def test_a_holder_on_one_worker_keeps_the_job_off_every_worker(hosts):
    lockfile = Path(hosts[1].workdir) / "tmp" / "libtpu_lockfile"
    lockfile.parent.mkdir(exist_ok=True)
    lockfile.write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(lockfile)!r}); import time; time.sleep(600)"]
    )
    try:
        wait_for(lambda: holds(holder.pid, lockfile))
        assert jobs.status(hosts)[1].holders == (str(holder.pid),)
        with pytest.raises(jobs.JobBusy, match=f"w01: pids {holder.pid}"):
            jobs.launch(hosts, spec(STEPS="1000"))
        assert states(hosts) == ["absent"] * 3
    finally:
        holder.kill()
        holder.wait()


def test_a_worker_that_cannot_start_the_job_stops_it_everywhere(hosts):
    broken = Path(hosts[1].workdir) / ".tpuctl"
    broken.mkdir()
    (broken / "jobs").write_text("not a directory")  # w01 cannot keep job records
    with pytest.raises(TpuctlError, match=r"did not start on 1 worker: w01"):
        jobs.launch(hosts, spec(STEPS="1000"))
    report = jobs.status([hosts[0], hosts[2]])
    assert [j.state for j in report] == ["exited", "exited"]
    assert trainer_pids("secret_len") == []
