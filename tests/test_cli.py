"""The CLI shell: fast start-up, no heavy imports, one-line errors."""

import json
import subprocess
import sys

import pytest

from tpuctl.cli import _exit_status

HEAVY_MODULES = ("jax", "flax", "optax", "orbax", "google.cloud.tpu_v2", "google.cloud.storage")


def tpuctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpuctl", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_commands_and_exits_zero():
    result = tpuctl("--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout


def test_version():
    result = tpuctl("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("tpuctl ")


def heavy_modules_after(statements: str) -> list[str]:
    """The HEAVY_MODULES a fresh interpreter has imported after running `statements`."""
    code = (
        f"import json, sys; {statements}; "
        f"print(json.dumps([m for m in {HEAVY_MODULES!r} if any(k == m or k.startswith(m + '.') "
        "for k in sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_cli_import_pulls_in_no_heavy_library():
    assert heavy_modules_after("import tpuctl.cli; tpuctl.cli.load_commands([])") == []


def test_the_resume_refusals_tpuctl_run_makes_import_no_heavy_library():
    """`tpuctl run` refuses what the trainer refuses on resume with the trainer's own rules
    (trainer.resume), so those must come without jax and orbax."""
    assert heavy_modules_after("import trainer.resume") == []


def test_cli_import_leaves_rich_and_paramiko_to_the_commands_that_use_them():
    # A cold `tpuctl exec` pays for every import: rich and paramiko come only when needed.
    code = (
        "import sys, tpuctl.cli; tpuctl.cli.load_commands([]); "
        "print(sorted({'rich', 'paramiko'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_each_command_loads_from_the_module_that_registers_it():
    import typer.main

    from tpuctl.cli import COMMAND_MODULES, app, load_commands

    load_commands([])
    registered = {
        info.name or typer.main.get_command_name(info.callback.__name__): info.callback.__module__
        for info in app.registered_commands
    }
    registered |= {
        info.name: info.typer_instance.registered_commands[0].callback.__module__
        for info in app.registered_groups
    }
    assert {name: f"tpuctl.cli.{m}" for name, m in COMMAND_MODULES.items()} == registered


def test_every_command_that_takes_a_node_takes_dash_dash_name():
    """A node is NAME for most commands and --name for `run`, `babysit`, `up`, `put` and
    `get`: --name works for all of them."""
    import typer.main

    from tpuctl.cli import app, load_commands

    load_commands([])
    commands = typer.main.get_command(app).commands
    takes_a_node = {
        name: command
        for name, command in commands.items()
        if any(p.name == "name" or "--name" in getattr(p, "opts", ()) for p in command.params)
    }
    assert {"run", "babysit", "up", "logs", "exec", "down", "status"} <= set(takes_a_node)
    without = [
        name for name, c in takes_a_node.items() if not any("--name" in p.opts for p in c.params)
    ]
    assert without == []


def test_a_command_imports_only_its_own_module():
    code = (
        "import sys, tpuctl.cli; sys.argv = ['tpuctl', 'exec', '--help']\n"
        "try: tpuctl.cli.main()\nexcept SystemExit: pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('tpuctl.cli.')), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout
    loaded = out.stderr.strip()
    assert "tpuctl.cli.workers" in loaded
    assert "tpuctl.cli.babysit" not in loaded and "tpuctl.cli.lifecycle" not in loaded


def test_the_ssh_transport_imports_paramiko_without_invoke():
    code = "import sys, tpuctl.fanout.ssh; print('invoke' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["no-such-command"], "no such command 'no-such-command' (usage: `tpuctl -h`)"),
        (["exce"], "no such command 'exce'. Did you mean 'exec'? (usage: `tpuctl -h`)"),
        (["ssh", "pod", "--worker", "0,1"],
         "invalid value for '--worker' / '-w': '0,1' is not a valid int (usage: `tpuctl ssh -h`)"),
        (["logs", "--bogus"], "no such option: --bogus (usage: `tpuctl logs -h`)"),
        (["up"], "missing argument 'accelerator_type' (usage: `tpuctl up -h`)"),
    ],
)  # fmt: skip
def test_a_usage_error_is_one_line_naming_the_flag_with_exit_2(args, line):
    """click's display was four lines: the command's usage, a hint, a blank, the error."""
    result = tpuctl(*args)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {line}\n")


def test_a_group_given_no_command_shows_its_help():
    result = tpuctl("config")
    assert result.returncode == 2 and result.stderr.startswith("Usage: tpuctl config")


def _entry(prelude: str, *args: str) -> subprocess.CompletedProcess:
    """`tpuctl ARGS` through the executable's entry point, after `prelude` ran."""
    code = f"import sys\n{prelude}\nsys.argv = ['tpuctl', *{args!r}]\nfrom tpuctl.cli import entry\nentry()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_executable_runs_atexit_handlers_and_flushes_piped_output_before_it_leaves():
    result = _entry("import atexit; atexit.register(print, 'atexit ran')", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["tpuctl 0.1.0", "atexit ran"]


def test_the_executable_waits_for_threads_still_running_as_the_interpreter_does():
    prelude = (
        "import threading\n"
        "work = lambda: (threading.Event().wait(0.5), print('thread finished', flush=True))\n"
        "threading.Thread(target=work).start()"
    )
    result = _entry(prelude, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["tpuctl 0.1.0", "thread finished"]


def test_the_executable_keeps_exit_statuses_and_one_line_errors():
    assert _entry("", "no-such-command").returncode == 2
    bad = _entry("", "babysit", "mynode")
    assert bad.returncode == 2 and bad.stderr.startswith("error: 'mynode' is not a TPU type")


def test_exit_codes_read_as_sys_exit_reads_them(capsys):
    assert [_exit_status(code) for code in (None, 0, 3)] == [0, 0, 3]
    assert _exit_status("stopped: no workers") == 1
    assert capsys.readouterr().err == "stopped: no workers\n"
