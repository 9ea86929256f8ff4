"""A child that dies with the process that started it, even when that one is SIGKILLed (Linux; elsewhere a no-op)."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Resolved before any fork: the child runs only this foreign call between fork and exec.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if sys.platform == "linux" else None
_prctl = _libc.prctl if _libc is not None else None


def die_with_parent() -> None:
    """`preexec_fn`: in the forked child, before exec, ask for SIGTERM when the parent dies. Otherwise a supervised
    process outlives its SIGKILLed supervisor and serves on unsupervised, holding its port, memory and cores, where
    `sovereign down` no longer finds it and the next start cannot bind."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
