"""One real Ray cluster for a whole test run: `ray start --head` bound to 127.0.0.1, in a temp dir of its
own, on free ports, with no dashboard, and with token authentication on a token of its own (Ray 2.60 turns
token auth on for `ray start --head`; drivers join with `RAY_AUTH_MODE=token` and the token file in
`RAY_AUTH_TOKEN_PATH`, so `~/.ray/auth_token` is neither read nor written).

The cluster is ended by the pids of the processes that name its temp dir on their command line (and
their children: Ray's workers rename themselves `ray::...`), never by a machine-wide `ray stop`: other
clusters on the machine (another engineer's tests, the embedded cluster of a job) are left alone.

`SESSION` holds the run's cluster (set by a session fixture); `session_cluster()` starts it on first use.
"""
from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """`single_machine`: Ray keeps every server on 127.0.0.1 and refuses other nodes; False for a cluster
    that other raylets join (`add_node`), which Ray then reaches through the host's address."""

    def __init__(self, num_cpus: int = 8, single_machine: bool = True, system_env: dict[str, str] | None = None):
        self.num_cpus, self.single_machine = num_cpus, single_machine
        self.system_env = system_env or {}  # RAY_<config> overrides for the head's GCS (e.g. health checks)
        self.temp_dir: Path | None = None
        self.address: str | None = None

    @property
    def started(self) -> bool:
        return self.address is not None

    def env(self) -> dict[str, str]:
        """What a driver (or `ray start`) needs in its environment to join this cluster."""
        assert self.temp_dir is not None
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.temp_dir / "auth_token"),
                "RAY_USAGE_STATS_ENABLED": "0",
                # Ray resolves 127.0.0.1 to the machine's address (so other nodes can reach it) unless told
                # that this cluster is single-machine; then its servers listen on 127.0.0.1 only.
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if self.single_machine else "1"}

    def start(self) -> str:
        if self.started:
            return self.address
        # Short and under /tmp: Ray puts unix sockets under it (108-byte path limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lmf-ray-", dir="/tmp"))
        atexit.register(self.stop)  # a run that ends without its session teardown still leaves nothing running
        token = self.temp_dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        port = free_port()
        ray = Path(sys.executable).with_name("ray")
        cmd = [str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
               "--temp-dir", str(self.temp_dir), "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
               "--include-dashboard", "false", "--include-log-monitor", "false", "--disable-usage-stats",
               "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
               "--metrics-export-port", str(free_port())]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Output to a file, not a pipe: the daemons it leaves running must not hold our end open.
        out = self.temp_dir / "ray_start.log"
        with open(out, "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**env, **self.env(), **self.system_env}, timeout=300)
        if r.returncode != 0:
            output = out.read_text()
            self.stop()
            raise RuntimeError(f"ray start --head failed ({r.returncode}):\n{output}")
        self.address = f"127.0.0.1:{port}"
        return self.address

    def add_node(self, num_cpus: int, num_gpus: int = 0, resources: dict[str, float] | None = None) -> None:
        """Another raylet joined to this head (`ray start --address`): a node of a real multi-node cluster on
        this machine. Its GPUs are declared, not real: Ray schedules by them, nothing runs CUDA on them."""
        import json

        assert self.address is not None, "start the head first"
        ray = Path(sys.executable).with_name("ray")
        cmd = [str(ray), "start", "--address", self.address, "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus), "--disable-usage-stats",
               "--temp-dir", str(self.temp_dir), "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
               "--metrics-export-port", str(free_port()), "--include-log-monitor", "false"]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = self.temp_dir / f"ray_start_node{free_port()}.log"
        with open(out, "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**env, **self.env()}, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"ray start --address failed ({r.returncode}):\n{out.read_text()}")

    def node_table(self) -> list[dict]:
        """`ray.nodes()` of this cluster, read by a short-lived driver (this process never joins a cluster)."""
        import json

        code = ("import json, ray; ray.init(address=%r, log_to_driver=False, include_dashboard=False); "
                "print('NODES', json.dumps(ray.nodes()))" % self.address)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **self.env()},
                           timeout=120)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("NODES ")), None)
        if line is None:
            raise RuntimeError(f"could not list the nodes of {self.address}:\n{r.stderr[-3000:]}")
        return json.loads(line[len("NODES "):])

    def node_with(self, resource: str) -> dict:
        """The alive node that declares the custom resource `resource`."""
        return next(n for n in self.node_table() if n["Alive"] and resource in n["Resources"])

    def stop_node(self, node: dict) -> None:
        """Ends one worker node as a machine loss would: its raylet and every process under it, SIGKILLed."""
        mark = f"--raylet_socket_name={node['RayletSocketName']}"
        raylets = [p for p in self.processes() if mark in (p.cmdline() or [])]
        assert raylets, f"no raylet with {mark}"
        procs = [q for p in raylets for q in (p, *p.children(recursive=True))]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def processes(self) -> list[psutil.Process]:
        """The processes that name the temp dir on their command line, and their children."""
        if self.temp_dir is None:
            return []
        mark, me = str(self.temp_dir), os.getpid()
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != me and any(mark in a for a in (p.info["cmdline"] or [])):
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        found.setdefault(c.pid, c)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    def stop(self, grace_s: float = 5.0) -> None:
        # SIGTERM, then SIGKILL what is left after grace_s (gcs_server and the autoscaler monitor ignore
        # SIGTERM for longer than that; a test cluster has no state worth a graceful exit).
        procs = self.processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            _, procs = psutil.wait_procs(procs, timeout=grace_s)
            procs += [p for p in self.processes() if p.pid not in {q.pid for q in procs}]
            if not procs:
                break
        left = self.processes()
        if self.temp_dir is not None and not left:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.address = None
        if left:
            raise RuntimeError(f"Ray processes still running after stop: {[p.pid for p in left]}")


SESSION: RayHead | None = None


def session_cluster() -> RayHead:
    """The test run's shared cluster, started on first use."""
    if SESSION is None:
        raise RuntimeError("no session Ray cluster: the `shared_ray` session fixture sets one up")
    SESSION.start()
    return SESSION

