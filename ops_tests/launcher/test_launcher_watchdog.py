"""The watchdog only ever kills the process that wrote a heartbeat, never a later holder of its pid."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from launcher.watchdog import wrote_report


def test_wrote_report_rejects_a_reused_pid():
    me = {"pid": os.getpid(), "heartbeat": time.time()}
    assert wrote_report(me)
    before = time.time() - 1
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # a heartbeat older than the process that now holds the pid: not its report
        assert not wrote_report({"pid": child.pid, "heartbeat": before})
        assert wrote_report({"pid": child.pid, "heartbeat": time.time() + 0.01})
    finally:
        child.kill()
        child.wait()
    assert not wrote_report({"pid": child.pid, "heartbeat": time.time()})  # gone
