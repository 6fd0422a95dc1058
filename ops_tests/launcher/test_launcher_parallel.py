"""Model parallelism through the real CLI: a tiny RMT job with `parallel: {tp: 2}` trains on 2 CPU workers
(local Ray, DeepSpeed over gloo, MLflow), `launcher eval` of its export reproduces the logged val loss, and
`launcher resume --set parallel.*` continues it on another layout (dp2) from the consolidated export
(resharding). The RMT runs here as the newest entrant through the registry alone (its residual matrix,
vocab-split position table and z-loss under TP). Pipeline stages are resharded on real engines in
`ops_tests/parallel/test_reshard.py` (tp2×pp2 ↔ dp2) and every layout runs in the layout harness."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from test_launcher_e2e import LOCAL, launcher, status

pytestmark = pytest.mark.slow
SPLIT, STEPS = 16, 24
EVAL_SAMPLES = 64


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_tp2_job_trains_and_resumes_resharded(tmp_path):
    home = tmp_path
    spec = yaml.safe_load(LOCAL.read_text())
    spec["model"] = {"arch": "rmt", "preset": "tiny"}
    spec["optim"] = {**spec["optim"], "lr": 1e-2}  # the RMT repository's own lr: its µP init starts slower at 3e-3
    spec["parallel"] = {**spec.get("parallel", {}), "tp": 2}
    spec["train"] = {**spec["train"], "steps": SPLIT, "eval_every": 8, "checkpoint_every": 8,
                     "output_dir": str(home / "runs")}
    spec.setdefault("tracking", {})["system_metrics"] = False
    spec["data"] = {**spec["data"], "eval_samples": EVAL_SAMPLES}  # the same samples `launcher eval` reads below
    config = home / "tp2.yaml"
    config.write_text(yaml.safe_dump(spec))

    r = launcher("submit", str(config), "--name", "mp", home=home, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    st = status("mp", home)
    assert st["state"] == "SUCCEEDED" and st["step"] == SPLIT and len(st["workers"]) == 2, st
    uri, run_id = st["mlflow"]["tracking_uri"], st["mlflow"]["run_id"]
    losses = _history(uri, run_id, "loss")
    assert [s for s, _ in losses] == list(range(SPLIT))
    vals = _history(uri, run_id, "val_loss")
    assert vals and vals[-1][1] < losses[0][1] - 1.0, (losses[:3], vals)
    # The export gathers TP shards into whole tensors: one process evaluates it to
    # the val_loss the 4 ranks logged (the same validation samples).
    r = launcher("eval", "mp", "--samples", str(EVAL_SAMPLES), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["val_loss"] == pytest.approx(vals[-1][1], rel=1e-4)
    _export_weights_only(home, "mp")

    # Reshard: the tp2 checkpoint resumes as plain data parallelism on 2 workers.
    r = launcher("resume", "mp", "--set", "parallel.tp=1", "--set", "cluster.workers=2",
                 "--set", f"train.steps={STEPS}", home=home, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    st = status("mp", home)
    assert st["state"] == "SUCCEEDED" and st["step"] == STEPS and len(st["workers"]) == 2, st
    rank0 = (home / "runs" / "mp" / "logs" / "rank0.log").read_text()
    assert "written with tp=2 pp=1 dp=1; loading its consolidated state into tp=1 pp=1 dp=2" in rank0
    losses = dict(_history(uri, run_id, "loss"))
    assert sorted(losses) == list(range(STEPS))
    # the resumed run continues where the checkpoint left off, not from a fresh model
    first_resumed = losses[SPLIT]
    assert first_resumed < losses[0] - 1.0, losses
    assert re.search(r"val_loss at step \d+", r.stdout), r.stdout


def test_memoryformer_tp2_job_trains_and_eval_reproduces_its_val_loss(tmp_path):
    """MemoryFormer's tables split by columns over 2 CPU workers through the real CLI, with the tables' own
    optimizer group (lr × 3, no decay); the consolidated export evaluates in one process to the logged val loss."""
    home, steps = tmp_path, 8
    spec = yaml.safe_load(LOCAL.read_text())
    spec["model"] = {"arch": "memoryformer", "preset": "tiny"}
    spec["optim"] = {**spec["optim"], "lr": 1e-2, "warmup_steps": 2, "table_lr_multiplier": 3.0,
                     "table_weight_decay": 0.0}
    spec["parallel"] = {**spec.get("parallel", {}), "tp": 2}
    spec["train"] = {**spec["train"], "steps": steps, "eval_every": steps, "checkpoint_every": steps,
                     "output_dir": str(home / "runs")}
    spec.setdefault("tracking", {})["system_metrics"] = False
    spec["data"] = {**spec["data"], "eval_samples": EVAL_SAMPLES}
    config = home / "mf.yaml"
    config.write_text(yaml.safe_dump(spec))

    r = launcher("submit", str(config), "--name", "mf", home=home, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    st = status("mf", home)
    assert st["state"] == "SUCCEEDED" and st["step"] == steps and len(st["workers"]) == 2, st
    uri, run_id = st["mlflow"]["tracking_uri"], st["mlflow"]["run_id"]
    losses = _history(uri, run_id, "loss")
    assert [s for s, _ in losses] == list(range(steps))
    vals = _history(uri, run_id, "val_loss")
    assert vals and vals[-1][1] < losses[0][1] - 1.0, (losses, vals)
    r = launcher("eval", "mf", "--samples", str(EVAL_SAMPLES), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["val_loss"] == pytest.approx(vals[-1][1], rel=1e-4)


def _export_weights_only(home, name: str) -> None:  # noqa: ANN001
    """An arch with no transformers class: `--format hf` is refused with the reason (nothing written);
    `--format safetensors` writes exactly the checkpoint's weights under our names, and our config."""
    from safetensors.torch import load_file

    from parallel import consolidated

    r = launcher("export", name, "--format", "hf", "--out", str(home / "hf"), home=home)
    assert r.returncode != 0 and not (home / "hf").exists()
    assert "model arch 'rmt' has no transformers class" in r.stderr and "allowed for it: --format safetensors" in r.stderr
    r = launcher("export", name, "--format", "safetensors", "--out", str(home / "st"), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout)
    weights = load_file(str(home / "st" / "model.safetensors"))
    tensors, _ = consolidated.read(Path(info["checkpoint"]) / "consolidated")
    params = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
    assert weights.keys() == params.keys() and all(torch.equal(weights[k], params[k]) for k in params)
    ours = json.loads((home / "st" / "lmforge_config.json").read_text())
    assert ours["arch"] == "rmt" and ours["step"] == info["step"] and ours["config"]["d_key"] == 16


def test_a_transformers_llama_trains_from_its_weights_at_tp2_and_exports_back(tmp_path, small_shards):
    """`model.init_from: hf:DIR`: a tiny random transformers Llama (saved here, no hub) is the job's starting
    point at tp2 — its loss on the first batch is the first loss logged — it trains, and its export loads back
    in transformers as a Llama of the same shapes."""
    import shutil

    import transformers

    from data_pipeline import TokenStream
    from parallel.step import lm_loss, split_batch

    hf_dir, home = tmp_path / "llama", tmp_path / "home"
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=64))
    with torch.no_grad():  # confident predictions: a first loss far from ln V tells its weights from seeded ones
        llama.lm_head.weight.mul_(60)
    llama.save_pretrained(hf_dir)
    shutil.copyfile(small_shards / "tokenizer.json", hf_dir / "tokenizer.json")
    spec = yaml.safe_load(LOCAL.read_text())
    spec["model"] = {"arch": "transformer", "preset": "tiny", "init_from": f"hf:{hf_dir}"}
    spec["parallel"] = {**spec.get("parallel", {}), "tp": 2}
    spec["data"] = {**spec["data"], "shards": str(small_shards), "seq_len": 32, "vocab_size": 512, "micro_batch": 4,
                    "global_batch": 8}
    spec["optim"] = {**spec["optim"], "lr": 1e-2, "warmup_steps": 1}
    spec["train"] = {**spec["train"], "steps": 6, "eval_every": 6, "checkpoint_every": 6, "output_dir": str(home / "runs")}
    spec.setdefault("tracking", {})["system_metrics"] = False
    home.mkdir()
    (home / "hf.yaml").write_text(yaml.safe_dump(spec))

    r = launcher("submit", str(home / "hf.yaml"), "--name", "imported", home=home, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    st = status("imported", home)
    assert st["state"] == "SUCCEEDED" and len(st["workers"]) == 2, st
    losses = _history(st["mlflow"]["tracking_uri"], st["mlflow"]["run_id"], "loss")
    stream = TokenStream(small_shards, seed=spec["train"].get("seed", 0), global_batch=8, micro_batch=4, dp_rank=0,
                         dp_size=1)
    batches = stream.micro_batches()
    with torch.no_grad():
        first = sum(lm_loss(llama(i).logits, t).item() for i, t in (split_batch(next(batches), torch.device("cpu"))
                                                                      for _ in range(2))) / 2
    assert first > 2 * math.log(512)  # the scaled head: far from a seeded model's ≈ ln V
    assert losses[0][1] == pytest.approx(first, rel=1e-4), (losses[:2], first)
    assert losses[-1][1] < losses[0][1] - 1.0, losses

    r = launcher("export", "imported", "--format", "hf", "--out", str(home / "back"), home=home)
    assert r.returncode == 0, r.stderr[-4000:]
    back = transformers.AutoModelForCausalLM.from_pretrained(home / "back")
    assert type(back).__name__ == "LlamaForCausalLM" and back.config.num_key_value_heads == 2
    assert back.config.vocab_size == 512 and back.config.hidden_size == 64
