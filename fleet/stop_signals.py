"""Ctrl-C and a service manager's SIGTERM for a job whose main thread only waits (`flotilla robot`,
`flotilla console`): both set one event, and the job stops gracefully."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


class StopSignals:
    """Installs the handlers when made: make it before the job says it runs, so a stop sent as soon as
    it does is never the default action (a traceback for SIGINT, death for SIGTERM)."""

    def __init__(self):
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.event.set())

    def wait(self, running: Callable[[], bool] = lambda: True, slice_s: float = 0.2) -> None:
        """Until a stop signal, or until `running()` turns false. In slices: a signal may land on another
        thread (cyclonedds', gRPC's), and Python runs the handler only when the main thread next runs
        bytecode, which a bare Event.wait() never does (flotilla robot hung after Ctrl-C)."""
        while running() and not self.event.wait(slice_s):
            pass
