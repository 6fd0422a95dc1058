"""Job-spec loading and validation: every bad spec is refused with one line naming the key and what is allowed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.errors import SpecError
from launcher.spec import JobSpec, load_spec
from launcher.validate import data_parallel_size, validate

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster_configs" / "local.yaml"


def _check(overrides: list[str], base: Path | None = LOCAL) -> None:
    validate(load_spec(base, overrides))


def test_shipped_configs_validate():
    for path in (ROOT / "cluster_configs").glob("*.yaml"):
        if path.name == "ray_cluster.yaml":
            continue
        spec = load_spec(path)
        assert isinstance(spec, JobSpec)
    validate(load_spec(LOCAL))


def test_deltanet_context_parallel_spec_validates():
    validate(load_spec(LOCAL, ["model.arch=deltanet", "parallel.cp=2"]))
    validate(load_spec(LOCAL, ["model.arch=deltanet", "parallel.cp=2", "parallel.tp=2", "parallel.pp=2",
                               "cluster.workers=8", "parallel.zero=1"]))


def test_overrides_are_typed_and_applied():
    spec = load_spec(LOCAL, ["train.steps=7", "optim.lr=1e-4", "tracking.uri=null", "model.d_model=64"])
    assert spec.train.steps == 7 and spec.optim.lr == pytest.approx(1e-4)
    assert spec.tracking.uri is None and spec.model.overrides == {"d_model": 64}
    assert spec.flat()["model.d_model"] == 64


BAD = [
    (["train.stepz=5"], "train.stepz", ["unknown key", "steps", "eval_every"]),
    (["trian.steps=5"], "trian", ["unknown section", "train", "cluster"]),
    (["train.steps=many"], "train.steps", ["expected int", "'many'"]),
    (["train.steps=0"], "train.steps", [">= 1"]),
    (["optim.lr=-1"], "optim.lr", ["> 0"]),
    (["model.arch=gpt5"], "model.arch", ["gpt5", "transformer"]),
    (["model.preset=huge"], "model.preset", ["huge", "tiny", "1.3b"]),
    (["model.n_heads=5"], "model", ["d_model", "n_heads"]),
    (["model.d_modle=64"], "model", ["d_modle", "d_model"]),
    (["parallel.dp=3"], "cluster.workers", ["1×1×3×1 = 3", "cluster.workers = 2"]),
    (["cluster.workers=3", "parallel.dp=null"], "data.global_batch", ["16", "8 × 3 = 24"]),
    (["data.global_batch=24"], "data.global_batch", ["24", "8 × 2 = 16"]),
    (["parallel.zero=3"], "parallel.zero", ["allowed: 0, 1, 2"]),
    (["fault.nonfinite=ignore"], "fault.nonfinite", ["ignore", "skip_step", "stop"]),
    (["parallel.cp=2"], "parallel.cp", ["'transformer'", "no context-parallel core", "allowed: 1"]),
    (["model.arch=deltanet", "model.hybrid=swa", "parallel.cp=2"], "parallel.cp", ["attention layers", "ring attention"]),
    (["model.arch=deltanet", "parallel.cp=2", "data.seq_len=4"], "parallel.cp", ["2 tokens per rank", "3-token halo"]),
    (["model.arch=deltanet", "model.hybrid=mamba"], "model", ["mamba", "none, swa, global"]),
    (["parallel.tp=3", "cluster.workers=3"], "parallel.tp", ["n_heads=4", "tp=3", "4 % 3 = 1"]),
    (["parallel.tp=2", "data.vocab_size=1001"], "parallel.tp", ["tok_embeddings.weight", "1001", "tp=2"]),
    (["parallel.pp=2", "parallel.zero=2"], "parallel.zero", ["ZeRO stage 0 or 1", "got 2"]),
    (["parallel.pp=8", "cluster.workers=8"], "parallel.pp", ["pp=8", "only 7 pipeline blocks"]),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", ["tp > 1"]),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=129"], "parallel.sequence_parallel",
     ["129", "tp=2"]),
    (["parallel.ep=2"], "parallel.ep", ["'transformer'", "no experts", "allowed: 1"]),
    (["model.arch=moeut", "parallel.ep=3", "cluster.workers=3", "data.global_batch=24"], "parallel.ep", ["n_experts=8", "ep=3", "8 % 3 = 2"]),
    (["model.arch=moeut", "parallel.ep=2", "parallel.dp=1", "cluster.workers=1"], "parallel.ep",
     ["ep=2", "dp×cp = 1×1 = 1"]),
    (["model.arch=moeut", "parallel.ep=2", "parallel.pp=2", "cluster.workers=4"], "parallel.ep", ["pipeline", "allowed"]),
    (["model.arch=moeut", "parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel",
     ["mixture-of-experts", "allowed: false"]),
    (["model.arch=moeut", "model.group_order=abba"], "model", ["abba", "abab, aabb"]),
    (["model.arch=rmt", "model.d_key=0"], "model", ["RMTConfig.d_key", "positive int", "0"]),
    (["model.arch=rmt", "model.d_ff=-4"], "model", ["RMTConfig.d_ff", "positive int", "-4"]),
    (["model.arch=rmt", "model.pos_encoding=rope"], "model", ["'rope'", "learned, alibi"]),
    (["model.arch=rmt", "model.norm=batchnorm"], "model", ["'batchnorm'", "rmsnorm, layernorm"]),
    (["model.arch=rmt", "model.max_seq_len=64"], "model.max_seq_len", ["64", "data.seq_len (128)", ">= 128"]),
    (["model.arch=rmt", "parallel.tp=3", "cluster.workers=3"], "parallel.tp", ["rank=4", "tp=3", "4 % 3 = 1"]),
    (["model.arch=rmt", "parallel.cp=2"], "parallel.cp", ["'rmt'", "no context-parallel core", "allowed: 1"]),
    (["model.arch=rmt", "parallel.ep=2"], "parallel.ep", ["'rmt'", "no experts", "allowed: 1"]),
    (["model.arch=rmt", "model.pos_encoding=alibi", "parallel.tp=2"], "model.pos_encoding",
     ["alibi", "allowed with parallel.tp > 1: learned"]),
    (["model.arch=memoryformer", "model.code_bits=6"], "model", ["d_model=64", "code_bits=6", "64 % 6 = 4"]),
    (["model.arch=memoryformer", "model.num_tables=4"], "model", ["num_tables=4", "= 32", "d_model=64"]),
    (["model.arch=memoryformer", "model.ffn_expand_bits=13"], "model", ["ffn_expand_bits=13", "2^21", "<= 20"]),
    (["model.arch=memoryformer", "model.score_fn=softmax"], "model", ["'softmax'", "official, paper"]),
    (["model.arch=memoryformer", "model.ffn_expand_mode=wide"], "model", ["'wide'", "extra_bit, extra_table"]),
    (["model.arch=memoryformer", "parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel",
     ["output columns", "no row-parallel layer", "allowed: false"]),
    (["model.arch=memoryformer", "parallel.cp=2"], "parallel.cp", ["'memoryformer'", "no context-parallel core"]),
    (["model.arch=memoryformer", "parallel.ep=2"], "parallel.ep", ["'memoryformer'", "no experts", "allowed: 1"]),
    (["optim.table_lr_multiplier=3"], "optim.table_lr_multiplier", ["lookup tables", "'transformer' declares none", "1.0"]),
    (["model.arch=memoryformer", "optim.table_lr_multiplier=0"], "optim.table_lr_multiplier", ["> 0", "0.0"]),
    (["model.arch=memoryformer", "optim.table_weight_decay=-1"], "optim.table_weight_decay", [">= 0", "-1"]),
    (["model.init_from=llama-7b"], "model.init_from", ["'llama-7b'", "allowed: hf:DIR"]),
    (["model.arch=rmt", "model.init_from=hf:/nonexistent"], "model.init_from", ["Transformer++", "allowed: transformer"]),
    (["model.init_from=hf:/nonexistent/llama"], "model.init_from", ["/nonexistent/llama", "no config.json"]),
    (["parallel.pipeline_partition=best"], "parallel.pipeline_partition", ["parameters", "uniform"]),
    (["cluster.device=tpu"], "cluster.device", ["auto", "cpu", "cuda"]),
    (["train.output_dir=3"], "train.output_dir", ["expected str"]),
    (["train.steps"], "train.steps", ["section.key=value"]),
]


@pytest.mark.parametrize("overrides,key,fragments", BAD, ids=[b[1] + ":" + b[0][-1] for b in BAD])
def test_bad_spec_names_key_and_allowed_values(overrides, key, fragments):
    with pytest.raises(SpecError) as info:
        _check(overrides)
    msg = str(info.value)
    assert info.value.key == key, msg
    assert msg.startswith(key), msg
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text(yaml.safe_dump({"train": {"steps": 3}, "extra": {}}))
    with pytest.raises(SpecError, match="unknown section"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such job spec file"):
        load_spec(tmp_path / "missing.yaml")


def test_dp_is_derived_from_workers():
    assert data_parallel_size(load_spec(LOCAL, ["cluster.workers=4", "data.global_batch=32"])) == 4


def _cli(*args: str, env_home: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "LMFORGE_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_reports_one_line_without_traceback(tmp_path):
    r = _cli("submit", str(LOCAL), "--set", "train.stepz=5", "--set", f"train.output_dir={tmp_path}", env_home=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.stepz: unknown key"), r.stderr
    assert "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir()) or not (tmp_path / "jobs.json").exists()  # nothing started or registered


def test_cli_missing_shards_hints_data_prepare(tmp_path):
    r = _cli("submit", str(LOCAL), "--set", f"data.shards={tmp_path / 'nowhere'}", "--set", "data.corpus=null",
             "--set", f"train.output_dir={tmp_path / 'runs'}", "--name", "noshards", env_home=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "launcher data prepare" in r.stderr and "nowhere" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_corpus_path_is_named(tmp_path):
    r = _cli("submit", str(LOCAL), "--set", f"data.corpus={tmp_path / 'no_corpus'}", "--set", f"data.shards={tmp_path / 's'}",
             "--set", f"train.output_dir={tmp_path / 'runs'}", "--name", "nocorpus", env_home=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "no_corpus" in r.stderr and "Traceback" not in r.stderr


def test_cli_unwritable_mlflow_store_fails_before_training(tmp_path, small_shards):
    # Permission bits do not stop root; a store whose directory cannot be created fails for everyone.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the store directory should be")
    r = _cli("submit", str(LOCAL), "--set", f"data.shards={small_shards}", "--set", f"tracking.uri=sqlite:///{blocker}/mlflow.db", "--set", "data.seq_len=32",
             "--set", f"train.output_dir={tmp_path / 'runs'}", "--name", "rostore", env_home=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: tracking.uri") and str(blocker) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    workers = tmp_path / "runs" / "rostore" / "workers"
    assert not workers.exists() or not any(workers.iterdir())  # no rank ever started
