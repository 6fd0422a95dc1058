"""End to end: the real `launcher` CLI, a real local Ray cluster, DeepSpeed over gloo, webdataset
shards of the built-in corpus, and results read back through `mlflow.MlflowClient`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import ray_head

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster_configs" / "local.yaml"
STEPS = 40

pytestmark = pytest.mark.slow


def launcher(*args: str, home: Path, timeout: float = 600, embedded: bool = False,
             cluster: ray_head.RayHead | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess. `submit` and `resume` join `cluster`, by default the test run's one shared
    Ray cluster (`--address`, see ops_tests/ray_head.py and the `shared_ray` fixture), unless `embedded`: then
    the job starts its own local cluster in-process, as README's first command does."""
    env = {**os.environ, "LMFORGE_HOME": str(home)}
    if args and args[0] in ("submit", "resume") and not embedded:
        head = cluster or ray_head.session_cluster()
        args = (*args, "--address", head.address)
        env.update(head.env())
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=home)


def status(name: str, home: Path) -> dict:
    r = launcher("status", name, "--json", home=home)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def poll_status(name: str, home: Path) -> dict:
    """What `launcher status NAME --json` prints, from the same function (`launcher.jobs.status`) called in
    this process. For polling loops only: each CLI call costs seconds of CPU (it imports torch) that the
    job's ranks need on a 2-core machine. What the tests assert on at the end comes from the CLI."""
    from launcher import jobs

    registry = jobs.read_json(home / "jobs.json", {}) or {}
    return jobs.status(jobs.JobDir(Path(registry[name])))


def wait_for_status(name: str, home: Path, until, what: str, timeout_s: float = 300, poll_s: float = 0.3) -> dict:
    """`poll_status` until `until(status)` holds; the status it held on, or the test fails naming `what`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = poll_status(name, home)
        if until(st):
            return st
        time.sleep(poll_s)
    pytest.fail(f"timed out waiting for {what}: {st}")


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening_sockets(root_pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of `root_pid` and its descendants."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        pids = {root_pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.NoSuchProcess:
                name = "?"
            found.add((conn.laddr.ip, conn.laddr.port, name))
    return found


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e")
    # The one job on the embedded default cluster (no --address): README's first command takes this path.
    # While it runs, every listening socket of its process tree (driver, GCS, raylet, ranks) is recorded.
    cmd = [sys.executable, "-m", "launcher.cli", "submit", str(LOCAL), "--name", "e2e", "--set", f"train.steps={STEPS}",
           "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20", "--set", f"train.output_dir={home / 'runs'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=home,
                            env={**os.environ, "LMFORGE_HOME": str(home)})
    sockets: set = set()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            sockets.update(listening_sockets(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        done.set()
        sampler.join(timeout=10)
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr[-4000:]}"
    run_id = re.search(r"mlflow run id: (\w+)", stdout).group(1)
    uri = re.search(r"tracking uri: (\S+)", stdout).group(1)
    return {"home": home, "stdout": stdout, "run_id": run_id, "uri": uri, "listening": sockets}


def test_the_embedded_cluster_listens_on_loopback_only(job):
    names = {name for _, _, name in job["listening"]}
    assert any("raylet" in n or "gcs" in n for n in names), job["listening"]  # the sampler saw the cluster up
    assert any(n.startswith("ray::") for n in names), job["listening"]  # ...and its worker processes
    outside = {s for s in job["listening"] if s[0] not in LOOPBACK}
    assert not outside, f"listening beyond loopback: {sorted(outside)}"


def _history(job, key):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(job["uri"]).get_metric_history(job["run_id"], key))


def test_training_lowers_loss_and_reports_it(job):
    first = float(re.search(r"loss at step 0: ([\d.]+)", job["stdout"]).group(1))
    final_val = float(re.search(r"val_loss at step \d+: ([\d.]+)", job["stdout"]).group(1))
    assert final_val < first - 1.0, job["stdout"]
    assert f"mlflow ui --backend-store-uri {job['uri']}" in job["stdout"]


def test_mlflow_run_has_metrics_params_and_artifacts(job):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(job["uri"])
    run = client.get_run(job["run_id"])
    assert run.info.run_name == "e2e" and run.data.tags["job"] == "e2e" and run.info.status == "FINISHED"
    loss = _history(job, "loss")
    assert len(loss) >= 20 and [s for s, _ in loss] == list(range(STEPS))
    for key in ("val_loss", "tokens_per_s", "step_time_s", "lr", "grad_norm"):
        assert _history(job, key), key
    assert all(v > 0 for _, v in _history(job, "tokens_per_s"))
    assert [s for s, _ in _history(job, "val_loss")] == [19, 39]
    params = run.data.params
    assert params["model.arch"] == "transformer" and params["cluster.workers"] == "2"
    assert params["train.steps"] == str(STEPS)
    artifacts = {a.path for a in client.list_artifacts(job["run_id"])}
    assert {"spec.yaml", "tokenizer.json"} <= artifacts


def test_status_json_fields(job):
    st = status("e2e", job["home"])
    assert st["name"] == "e2e" and st["state"] == "SUCCEEDED" and st["step"] == STEPS and st["restarts"] == 0
    assert sorted(w["rank"] for w in st["workers"]) == [0, 1]
    assert all(w["host"] and w["pid"] > 0 for w in st["workers"])
    assert len({w["pid"] for w in st["workers"]}) == 2
    assert st["mlflow"] == {"tracking_uri": job["uri"], "run_id": job["run_id"]}
    assert st["last_checkpoint"].endswith(f"step_{STEPS}")
    # where start-up time went: seconds from the driver's start, phase by phase, in order
    phases = list(st["startup"])
    assert phases[:3] == ["checks_done", "ray_connected", "trainer_started"], st["startup"]
    assert phases[-1] == "first_step" and {"worker_entered", "model_built", "engine_ready", "data_opened"} <= set(phases)
    times = list(st["startup"].values())
    assert times == sorted(times) and times[0] > 0


def test_logs_and_eval(job):
    r = launcher("logs", "e2e", home=job["home"])
    assert r.returncode == 0 and "rank0.log" in r.stdout and "checkpoint" in r.stdout
    r = launcher("eval", "e2e", "--samples", "256", home=job["home"])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["step"] == STEPS
    # the same 256 validation samples, one process vs the two ranks that logged it
    assert result["val_loss"] == pytest.approx(_history(job, "val_loss")[-1][1], rel=1e-4)


def test_export_hf_loads_in_transformers_with_our_logits_and_tokenizer(job, tmp_path):
    """`launcher export --format hf`: transformers' Auto classes load the job's model (a Llama) and tokenizer;
    its logits equal our model's from the same checkpoint (fp32, 1e-5), its tokens our tokenizer's."""
    import transformers
    from tokenizers import Tokenizer

    import models
    from launcher.evaluate import resolve_checkpoint
    from launcher.orchestrator import resolve_shards
    from launcher.spec import load_spec
    from launcher.validate import model_config
    from parallel import consolidated

    out = tmp_path / "hf"
    r = launcher("export", "e2e", "--format", "hf", "--out", str(out), home=job["home"])
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout)
    assert info["step"] == STEPS and {"config.json", "model.safetensors", "tokenizer.json"} <= set(info["files"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the model reads this sentence and the next one"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids

    job_dir, ckpt = resolve_checkpoint(info["checkpoint"])
    spec = load_spec(job_dir.spec)
    ours = models.build(model_config(spec, vocab_size=hf.config.vocab_size))
    tensors, _ = consolidated.read(ckpt / "consolidated")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(tensors[f"param/{name}"])
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids), rtol=1e-5, atol=1e-5)
    assert resolve_shards(spec) is not None

    again = launcher("export", "e2e", "--format", "hf", "--out", str(out), home=job["home"])
    assert again.returncode != 0 and "exists and is not an empty directory; nothing written" in again.stderr
    bad = launcher("export", "e2e", "--format", "onnx", "--out", str(tmp_path / "x"), home=job["home"])
    assert bad.returncode != 0 and "allowed: hf, safetensors" in bad.stderr and not (tmp_path / "x").exists()


def test_generate_at_temperature_zero_is_greedy_decoding_of_the_checkpoint(job):
    """`launcher generate` decodes through the KV cache; at temperature 0 its tokens are those of greedy decoding
    by repeated full forwards of the same checkpoint's model."""
    from launcher.evaluate import load_checkpoint_model

    r = launcher("generate", "e2e", "--prompt", "the model", "--max-new-tokens", "8", "--json", home=job["home"])
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout)
    assert out["step"] == STEPS and 1 <= len(out["tokens"]) <= 8 and out["tokens_per_s"] > 0
    model = load_checkpoint_model(str(Path(out["checkpoint"]))).model
    tokens = torch.tensor([out["prompt_tokens"]])
    with torch.no_grad():
        for _ in range(len(out["tokens"])):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tokens[0, len(out["prompt_tokens"]):].tolist() == out["tokens"]
    bad = launcher("generate", "e2e", "--prompt", "x", "--top-p", "0", home=job["home"])
    assert bad.returncode != 0 and "--top-p must be in (0, 1], got 0.0" in bad.stderr


def test_eval_tasks_log_into_the_job_run_at_the_checkpoint_step(job, tmp_path):
    """`launcher eval --tasks ppl,blimp`: the ppl task's loss is the logged val_loss; every metric lands in the
    job's MLflow run as eval/<task>/<metric> at the checkpoint's step; unknown tasks list the known."""
    blimp_dir = tmp_path / "blimp"
    blimp_dir.mkdir()
    (blimp_dir / "agreement.jsonl").write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b}) + "\n" for g, b in
                                               (("The dogs bark.", "The dogs barks."), ("A cat sleeps.", "A cat sleep."))))
    r = launcher("eval", "e2e", "--tasks", "ppl,blimp", "--samples", "256", "--blimp-dir", str(blimp_dir), "--json",
                 home=job["home"])
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout)
    assert out["step"] == STEPS and out["tasks"]["ppl"]["val_loss"] == pytest.approx(_history(job, "val_loss")[-1][1], rel=1e-4)
    assert out["tasks"]["blimp"]["pairs"] == 2
    for key in ("eval/ppl/val_loss", "eval/ppl/loss_pos_0_1", "eval/blimp/accuracy", "eval/blimp/acc/agreement"):
        assert [s for s, _ in _history(job, key)] == [STEPS], key
    bad = launcher("eval", "e2e", "--tasks", "mmlu", home=job["home"])
    assert bad.returncode != 0 and "unknown task mmlu; known: ppl, blimp" in bad.stderr


@pytest.fixture(scope="module")
def continued(job):
    """The e2e job continued, on the shared cluster: its name resubmitted with --detach and a far-off step
    count (a resubmission resumes, into the same MLflow run), stopped while running, then `launcher resume`d
    to a few steps past the stop. One job serves the resubmission and the detach/stop/resume tests; it
    comes after the tests above, which read the job as it first finished."""
    home = job["home"]
    start = poll_status("e2e", home)["step"]
    out = f"train.output_dir={home / 'runs'}"
    detached = launcher("submit", str(LOCAL), "--name", "e2e", "--detach", "--set", "train.steps=2000",
                        "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", out, home=home)
    assert detached.returncode == 0, detached.stderr
    deadline = time.time() + 300
    while time.time() < deadline:
        st = poll_status("e2e", home)
        if st["state"] == "RUNNING" and st["step"] >= start + 3:
            break
        assert st["state"] in ("PENDING", "RUNNING"), st
        time.sleep(1)
    else:
        pytest.fail(f"job never got going: {st}")
    stop = launcher("stop", "e2e", home=home, timeout=300)
    stopped = status("e2e", home)
    resume = launcher("resume", "e2e", "--set", f"train.steps={stopped['step'] + 5}", home=home)
    return {"home": home, "start": start, "detached": detached, "stop": stop, "stopped": stopped, "resume": resume,
            "final": status("e2e", home)}


def test_resubmitting_the_name_resumes_into_the_same_run(job, continued):
    home, start, stopped_at = job["home"], continued["start"], continued["stopped"]["step"]
    assert continued["stopped"]["mlflow"]["run_id"] == job["run_id"]  # the resubmitted driver opened the same run
    r = continued["resume"]
    assert r.returncode == 0, r.stderr[-4000:]
    assert re.search(r"mlflow run id: (\w+)", r.stdout).group(1) == job["run_id"]
    steps = [s for s, _ in _history(job, "loss")]
    assert steps == list(range(stopped_at + 5))  # continued at step 40, then at the stop: nothing repeated, nothing skipped
    rank0 = (home / "runs" / "e2e" / "logs" / "rank0.log").read_text()
    assert f"resumed from {home / 'runs' / 'e2e' / 'checkpoints' / f'step_{start}'}" in rank0
    assert f"resumed from {home / 'runs' / 'e2e' / 'checkpoints' / f'step_{stopped_at}'}" in rank0


def test_detach_stop_resume(continued):
    assert continued["detached"].returncode == 0, continued["detached"].stderr
    assert continued["stop"].returncode == 0, continued["stop"].stderr
    st = continued["stopped"]
    assert st["state"] == "STOPPED", st
    stopped_at = st["step"]
    assert continued["start"] + 3 <= stopped_at < 2000 and st["last_checkpoint"].endswith(f"step_{stopped_at}")

    r = continued["resume"]
    assert r.returncode == 0, r.stderr[-4000:]
    st = continued["final"]
    assert st["state"] == "SUCCEEDED" and st["step"] == stopped_at + 5
