"""paramiko, imported without invoke: paramiko imports invoke at start-up only for
ssh_config's `Match exec`, and that import is a fifth of a cold `tpuctl exec`'s time.
invoke is imported when a `Match exec` line is actually evaluated (`enable_match_exec`)."""

from __future__ import annotations

import logging
import sys
from types import ModuleType


def load() -> ModuleType:
    """The paramiko module, imported (once per process) with invoke held back, and its own
    log lines kept off stderr: tpuctl reports each host's trouble in one line itself, where
    Python would print paramiko's errors (a refused channel, a failed handshake) bare."""
    if "paramiko" not in sys.modules and "invoke" not in sys.modules:
        sys.modules["invoke"] = None  # type: ignore[assignment]  # `import invoke` fails
        try:
            import paramiko
        finally:
            del sys.modules["invoke"]
        logging.getLogger("paramiko").addHandler(logging.NullHandler())
    import paramiko

    return paramiko


def enable_match_exec() -> None:
    """Give paramiko's ssh_config the invoke it runs `Match exec` commands with.
    Raises ImportError when invoke is not installed."""
    import invoke

    load().config.invoke = invoke
