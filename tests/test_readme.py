"""The README is executable: every command in it that can run on this machine runs verbatim
against a fresh state directory, and its documented output is checked.

What runs is read from the README itself, so an edit there changes the test:
- ```bash blocks run as one script each (`set -e`): the block must exit 0.
- ```console blocks hold `$ COMMAND` lines, each followed by the lines it must print, in
  order (whitespace-insensitive; `...` stands for anything). A trailing `# exit N` comment
  on the command is its expected exit status (default 0). A command ending in `&` starts
  in the background; the next command waits until it has printed its first line.
- A command (or a whole block, by its first line) marked ☁ needs a real cloud and ⚙ sets up
  this machine (installs, the test suite): both are skipped. ```text, ```yaml and
  ```json blocks are never run; a bare ``` fence is refused, so each block is decided.

All blocks run in README order in one copy of the checkout (later blocks use what earlier
ones made, as a reader's session would), with a fresh HOME and XDG directories, this
environment's interpreter first on PATH, no TPUCTL_*, XLA_FLAGS, jax cache or emulator
settings, and TPUCTL_TIME_SCALE=0.01 (waits and backoff shortened, as the README says the
tests do).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fixtures_trainer import COMPILE_CACHE_ENV

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SKIP_MARKERS = ("☁", "⚙")
RUNNABLE = ("bash", "console")
BLOCK_TIMEOUT_S = 1200
SERVER_START_S = 60  # a backgrounded server's first line (it prints once it listens)


@dataclass
class Command:
    text: str
    line: int
    expected: list[str] = field(default_factory=list)
    exit_code: int = 0

    @property
    def background(self) -> bool:
        return _code(self.text).endswith("&")


@dataclass
class Block:
    kind: str  # bash | console
    line: int  # of the opening fence
    heading: str
    commands: list[Command]


def _code(text: str) -> str:
    """The command without its trailing comment."""
    return re.sub(r"\s+#[^'\"]*$", "", text.strip())


def _skipped(text: str) -> bool:
    return any(marker in text for marker in SKIP_MARKERS)


def parse(markdown: str) -> list[Block]:
    """The runnable blocks of a README, each with its commands and their expected output."""
    blocks: list[Block] = []
    heading, fence, body, start = "", None, [], 0
    for number, line in enumerate(markdown.splitlines(), 1):
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif match := re.match(r"^```(\w*)\s*$", line):
                fence, body, start = match[1], [], number
            continue
        if line.strip() != "```":
            body.append((number, line))
            continue
        if fence in RUNNABLE and body and not _skipped(body[0][1]):
            commands = _console(body) if fence == "console" else _bash(body)
            blocks.append(Block(fence, start, heading, commands))
        fence = None
    return blocks


def _bash(body: list[tuple[int, str]]) -> list[Command]:
    kept = [text for _, text in body if not _skipped(text)]
    return [Command("set -e\n" + "\n".join(kept), body[0][0])]


def _console(body: list[tuple[int, str]]) -> list[Command]:
    commands: list[Command] = []
    continued = False
    for number, text in body:
        if text.startswith("$ ") or continued:
            if continued:
                commands[-1].text += "\n" + text
            else:
                commands.append(Command(text[2:], number))
            continued = text.endswith("\\")
            exit_comment = re.search(r"#\s*exit (\d+)\s*$", text)
            if exit_comment:
                commands[-1].exit_code = int(exit_comment[1])
        elif commands and text.strip():
            commands[-1].expected.append(text)
    return [c for c in commands if not _skipped(c.text)]


def matches(expected: list[str], output: str) -> str | None:
    """None when every expected line matches an output line, in order; else the first
    expected line that did not."""
    lines = [" ".join(line.split()) for line in output.splitlines()]
    position = 0
    for wanted in expected:
        parts = " ".join(wanted.split()).split("...")
        pattern = re.compile(".*".join(re.escape(p) for p in parts))
        found = next((i for i in range(position, len(lines)) if pattern.search(lines[i])), None)
        if found is None:
            return wanted
        position = found + 1
    return None


def script_for(block: Block, out: Path) -> str:
    """A bash script running the block's commands in one shell (so `export` and `%1` carry
    from one command to the next), each one's output and status in OUT/N.out and N.rc."""
    log, rc = (shlex.quote(str(out / f"0.{suffix}")) for suffix in ("out", "rc"))
    if block.kind == "bash":  # in a subshell: its `set -e` ends the block, not the script
        return f"( {block.commands[0].text}\n) > {log} 2>&1\necho $? > {rc}\n"
    steps = []
    for index, command in enumerate(block.commands):
        log, rc = (shlex.quote(str(out / f"{index}.{suffix}")) for suffix in ("out", "rc"))
        steps.append(f"{{ {command.text}\n}} > {log} 2>&1\necho $? > {rc}")
        if command.background:  # wait for the server to say it is up: a condition, not a sleep
            polls = SERVER_START_S * 20
            steps.append(f"for _ in $(seq {polls}); do [ -s {log} ] && break; sleep 0.05; done")
    return "\n".join(steps) + "\n"


def checkout_copy(destination: Path) -> Path:
    """The checkout's files (tracked and not ignored) with this environment as its .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (destination / ".venv").symlink_to(Path(sys.prefix))
    return destination


def fresh_env(home: Path) -> dict[str, str]:
    dropped = (
        "XLA_FLAGS", "JAX_PLATFORMS", "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
        *COMPILE_CACHE_ENV,  # a reader's runs keep their compiled programs in the run directory
    )  # fmt: skip
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TPUCTL_", "XDG_", "PYTEST")) and k not in dropped
    }
    env |= {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "TPUCTL_TIME_SCALE": "0.01",
    }
    return env


def run_block(block: Block, workdir: Path, env: dict[str, str], out: Path) -> list[str]:
    """Run one block; the problems found (empty when it did what the README says)."""
    out.mkdir(parents=True)
    process = subprocess.Popen(
        ["bash", "-c", script_for(block, out)],
        cwd=workdir, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        process.wait(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [f"README line {block.line}: timed out after {BLOCK_TIMEOUT_S} s"]
    finally:  # servers the block started (and forgot to stop) go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    problems = []
    for index, command in enumerate(block.commands):
        rc_file, output = out / f"{index}.rc", (out / f"{index}.out").read_text(errors="replace")
        where = f"README line {command.line} ({block.heading}): {command.text.splitlines()[0]}"
        tail = "\n    ".join(output.splitlines()[-15:])
        if not rc_file.is_file():
            problems.append(f"{where}\n  never ran (an earlier command ended the block)")
            continue
        code = int(rc_file.read_text())
        if code != command.exit_code:
            problems.append(f"{where}\n  exit {code}, README says {command.exit_code}\n    {tail}")
        elif missing := matches(command.expected, output):
            problems.append(f"{where}\n  no line like {missing!r} in its output\n    {tail}")
    return problems


def test_every_readme_code_block_says_whether_it_runs():
    """A bare ``` fence would be silently never run: each block names its kind instead."""
    opening, bare = True, []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if re.match(r"^```(\w*)\s*$", line):
            if opening and line.strip() == "```":
                bare.append(number)
            opening = not opening
    assert not bare, f"README lines {bare}: say ```bash, ```console, ```text, ```yaml or ```json"


def test_the_readme_parses_into_runnable_commands_and_expectations():
    blocks = parse(README.read_text())
    commands = [c for b in blocks for c in b.commands]
    assert len(blocks) >= 8 and any(c.expected for c in commands)
    assert any(c.exit_code for c in commands)  # a documented error is checked too
    assert not any(_skipped(c.text) for c in commands)


def test_matching_is_in_order_whitespace_insensitive_with_ellipses():
    output = "w00   run-1  exited 0\nrun run-1 finished: step 30, final loss 3.16\n"
    assert matches(["w00 run-... exited 0", "finished: step 30, final loss ..."], output) is None
    assert matches(["finished", "w00"], output) == "w00"
    block = parse("# H\n```console\n$ a \\\n  b   # exit 2\nout\n$ c  # ☁ cloud\n```\n")
    assert [(c.text, c.exit_code, c.expected) for c in block[0].commands] == [
        ("a \\\n  b   # exit 2", 2, ["out"])
    ]


def test_every_tpuctl_command_the_readme_runs_exists():
    known = subprocess.run(
        [sys.executable, "-m", "tpuctl", "--help"], capture_output=True, text=True, check=True
    ).stdout
    used = {
        match
        for block in parse(README.read_text())
        for command in block.commands
        for match in re.findall(r"(?:^|[;&|]\s*)tpuctl ([a-z-]+)", command.text, re.M)
    }
    assert used and not [name for name in used if f" {name} " not in known]


NAMED_TEST = re.compile(
    r"(?:tests/)?(?P<file>test_\w+\.py)(?:::(?P<test>test_\w+))?|::(?P<more>test_\w+)"
)


def named_tests(text: str) -> list[tuple[str, str | None]]:
    """(file, test or None) for each test the README names: `tests/test_x.py::test_y`, and
    a bare `::test_z` after it for another test of the same file."""
    named, file = [], None
    for match in NAMED_TEST.finditer(text):
        file = match["file"] or file
        named.append((file, match["test"] or match["more"]))
    return named


def test_every_test_the_readme_names_exists():
    """The README backs its promises with named tests: a renamed or deleted test must not
    leave a promise pointing at nothing."""
    named = named_tests(README.read_text())
    assert named_tests("`a_test.py`, `tests/test_a.py::test_b`, `::test_c`, `test_d.py`") == [
        ("test_a.py", "test_b"), ("test_a.py", "test_c"), ("test_d.py", None)
    ]  # fmt: skip
    missing = []
    for file, test in named:
        path = REPO / "tests" / file
        if not path.is_file() or (test and f"def {test}(" not in path.read_text()):
            missing.append(f"{file}::{test}" if test else file)
    assert len(named) > 40 and not missing, f"the README names tests that do not exist: {missing}"


@pytest.mark.slow
def test_every_runnable_readme_command_works_as_written(tmp_path):
    workdir = checkout_copy(tmp_path / "checkout")
    env = fresh_env(tmp_path / "home")
    problems = []
    for index, block in enumerate(parse(README.read_text())):
        problems += run_block(block, workdir, env, tmp_path / "out" / str(index))
    assert not problems, "\n\n".join(problems)
