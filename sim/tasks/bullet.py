"""pybullet without its chatter: every pybullet task imports pybullet and connects through here.

pybullet's C code printed two lines straight to the process's file descriptors (past `sys.stdout`),
so a user running `flotilla demo` saw them between progress bars:

- `argv[0]=` on stdout at every connect. pybullet prints the arguments of the `options` string it is
  given, and pybullet_utils' BulletClient always passes one (empty). `PhysicsClient` connects without
  it, so nothing is printed.
- `pybullet build time: ...` on stderr when the module is first imported, unconditionally. The import
  below runs inside `quiet_native_output`, which captures file descriptors 1 and 2 for the length of
  the import and afterwards writes back everything else printed meanwhile (another thread's output, a
  real warning), so only that line goes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence

NOISE: tuple[bytes, ...] = (b"pybullet build time:",)

_LOCK = threading.Lock()  # one capture at a time: two would restore each other's descriptors


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers, so what C code printed lands where its descriptor pointed then."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to ask (not a POSIX platform)
        pass


def _flush_python() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def quiet_native_output(noise: Sequence[bytes] = NOISE) -> Iterator[None]:
    """Drop the lines starting with any of `noise` that are printed to fds 1 and 2 during the block."""
    with _LOCK:
        _flush_python()
        _flush_c_stdio()
        captures: list[tuple[int, int, tempfile._TemporaryFileWrapper]] = []
        try:
            for fd in (1, 2):
                try:
                    original = os.dup(fd)
                except OSError:  # not open: nothing to protect
                    continue
                capture = tempfile.TemporaryFile()
                os.dup2(capture.fileno(), fd)
                captures.append((fd, original, capture))
            yield
        finally:
            _flush_python()
            _flush_c_stdio()
            for fd, original, capture in captures:
                os.dup2(original, fd)
                os.close(original)
                capture.seek(0)
                lines = capture.read().splitlines(keepends=True)
                capture.close()
                rest = b"".join(line for line in lines if not line.startswith(tuple(noise)))
                with contextlib.suppress(OSError):
                    while rest:
                        rest = rest[os.write(fd, rest) :]


with quiet_native_output():
    import pybullet
    import pybullet_data


class PhysicsClient:
    """A pybullet physics server of its own (DIRECT: in this process, no GUI), with pybullet's functions
    as methods bound to it (as pybullet_utils' BulletClient, which prints `argv[0]=` at every connect)."""

    def __init__(self, mode: int = pybullet.DIRECT):
        self._pid = os.getpid()
        self._client = pybullet.connect(mode)  # no `options`: pybullet would print each of its arguments
        if self._client < 0:
            raise RuntimeError(f"pybullet could not connect (mode {mode})")

    def __getattr__(self, name: str):
        attribute = getattr(pybullet, name)
        if inspect.isbuiltin(attribute):
            attribute = functools.partial(attribute, physicsClientId=self._client)
        return attribute

    def disconnect(self) -> None:
        if self._client >= 0:
            client, self._client = self._client, -1
            with contextlib.suppress(pybullet.error):
                pybullet.disconnect(physicsClientId=client)

    def __del__(self):
        if self.__dict__.get("_client", -1) >= 0 and self._pid == os.getpid():
            self.disconnect()


__all__ = ["NOISE", "PhysicsClient", "pybullet", "pybullet_data", "quiet_native_output"]
