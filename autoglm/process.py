"""Child-process helpers shared by the launchers, so no process outlives the one that started it."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn for subprocess.Popen: the child gets SIGTERM when its parent dies (Linux),
    even when the parent was killed with SIGKILL and could not clean up."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
