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


BUSY_RANK = """
import sys, time
from pathlib import Path
from launcher.jobs import Heartbeat, JobDir, report_worker
job, rank, busy_s = JobDir(Path(sys.argv[1])), int(sys.argv[2]), float(sys.argv[3])
report_worker(job, rank, 5, attempt=0)
print("ready", flush=True)
with Heartbeat(job, rank, every_s=0.5):
    time.sleep(busy_s)  # a checkpoint being written, longer than the hang timeout
"""


def test_a_busy_rank_keeps_beating_and_a_frozen_one_is_killed(tmp_path):
    """Two real processes under one real Watchdog (timeout 2 s): a rank inside a 6 s phase wrapped in
    Heartbeat is left alone; the same rank SIGSTOPped in that phase goes silent and is killed."""
    import signal

    from launcher.jobs import JobDir
    from launcher.watchdog import Watchdog

    job = JobDir(tmp_path / "job")
    job.create()
    (job.path / "attempts.json").write_text('{"attempts": 1}')
    ranks = [subprocess.Popen([sys.executable, "-c", BUSY_RANK, str(job.path), str(r), "6"], stdout=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    for p in ranks:
        assert p.stdout.readline().strip() == "ready"
    ranks[1].send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    with Watchdog(job, hang_timeout_s=2.0, poll_s=0.25) as dog:
        busy_rc = ranks[0].wait(timeout=60)
        frozen_rc = ranks[1].wait(timeout=60)
    assert busy_rc == 0  # beat through a phase three times the hang timeout
    assert frozen_rc == -signal.SIGKILL
    assert [k["rank"] for k in dog.kills] == [1]
    kill = dog.kills[0]
    # judged on the watchdog's own clock: killed one timeout after the last beat, within two polls of it
    assert kill["heartbeat"] <= stopped_at + 0.5 and 2.0 < kill["killed_at"] - kill["heartbeat"] <= 2.0 + 2 * 0.25 + 0.5
