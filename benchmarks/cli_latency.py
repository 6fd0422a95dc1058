"""How long `launcher status` and `launcher stop` take, as a user runs them (a fresh CLI process each).

The job is a stand-in named so: a small process that plays the driver's part of the stop protocol (it
polls `<job>/stop` as rank 0 does each step and then writes STOPPED to state.json), so what is measured is
the CLI's own cost — imports, reading the job's files, noticing the new state — not a training step.
The stand-in answers within `--poll-s` (default 0.05 s), far below the CLI's own half-second wait loop.

    python benchmarks/cli_latency.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAND_IN_DRIVER = textwrap.dedent("""
    import json, os, sys, time
    job = sys.argv[1]
    poll = float(sys.argv[2])
    while not os.path.exists(os.path.join(job, "stop")):
        time.sleep(poll)
    state = json.load(open(os.path.join(job, "state.json")))
    state.update(state="STOPPED", updated_at=time.time())
    tmp = os.path.join(job, "state.json.tmp")
    json.dump(state, open(tmp, "w"))
    os.replace(tmp, os.path.join(job, "state.json"))
""")


def _cli(*args: str, home: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                       env={**os.environ, "LMFORGE_HOME": str(home)}, cwd=ROOT)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"launcher {' '.join(args)} failed: {r.stderr}")
    return took


def _running_job(home: Path, name: str, poll_s: float) -> subprocess.Popen:
    job = home / "runs" / name
    for d in ("logs", "workers", "checkpoints"):
        (job / d).mkdir(parents=True, exist_ok=True)
    (job / "spec.yaml").write_text("{}\n")
    driver = subprocess.Popen([sys.executable, "-c", STAND_IN_DRIVER, str(job), str(poll_s)])
    (job / "state.json").write_text(json.dumps({"name": name, "state": "RUNNING", "driver_pid": driver.pid,
                                                "driver_host": os.uname().nodename, "job_dir": str(job)}))
    registry = json.loads((home / "jobs.json").read_text()) if (home / "jobs.json").exists() else {}
    registry[name] = str(job)
    (home / "jobs.json").write_text(json.dumps(registry))
    return driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--poll-s", type=float, default=0.05)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        times: dict[str, list[float]] = {"status": [], "status NAME --json": [], "stop NAME": []}
        baseline = [_cli("--help", home=home) for _ in range(args.repeats)]  # interpreter + argparse: the floor
        for i in range(args.repeats):
            name = f"bench{i}"
            driver = _running_job(home, name, args.poll_s)
            times["status"].append(_cli("status", home=home))
            times["status NAME --json"].append(_cli("status", name, "--json", home=home))
            times["stop NAME"].append(_cli("stop", name, "--timeout", "30", home=home))
            driver.wait(timeout=30)
    floor = statistics.median(baseline)
    print(f"{'command':<28} {'median s':>9} {'max s':>7} {'x launcher --help':>18}")
    print(f"{'launcher --help':<28} {floor:9.3f} {max(baseline):7.3f} {1.0:18.2f}")
    for what, ts in times.items():
        print(f"{'launcher ' + what:<28} {statistics.median(ts):9.3f} {max(ts):7.3f} {statistics.median(ts) / floor:18.2f}")


if __name__ == "__main__":
    main()
