"""A daemon thread that lives for the span of a `with` block: the driver's watchdog, node watch and progress
display, and a rank's heartbeat during long phases."""
from __future__ import annotations

import threading
from typing import Any


class BackgroundLoop:
    """Subclasses set `thread_name`, call `super().__init__()` and write `_run`, which loops until `_stop` is
    set. Leaving the block sets it and joins the thread for up to `join_s` (a thread stuck longer is left to
    end with the process: it is a daemon)."""

    thread_name = "lmforge-loop"
    join_s = 10.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - the subclass
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.join_s)
