"""Delegation testbed: forward chosen system calls of a program to a delegate.

Public API (see docs/):
  syscalls  - x86-64 syscall table, ``lookup``, ``parse_set``, argument specs
  wire      - the msgpack/ZeroMQ protocol between relay and delegate
  rundir    - the run-directory format (``load``, ``derived``)
"""

from testbed.core import rundir, syscalls, wire
from testbed.core.errors import TestbedError

__version__ = "0.1.0"
__all__ = ["TestbedError", "rundir", "syscalls", "wire", "__version__"]
