"""The job spec: YAML -> typed dataclasses, with `--set a.b=c` overrides.

Key names here are a public contract (DESIGN.md "Stable names"): add, never rename.
Each section is a `<Name>Section` dataclass (not `...Spec`: `models.ModelSpec` is an architecture's
registration, a different thing).
Cross-field checks live in `launcher/validate.py`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import SpecError


@dataclass
class ClusterSection:
    workers: int = 2
    address: str | None = None  # None: start an embedded local Ray cluster
    cpus_per_worker: int = 1
    device: str = "auto"  # auto | cpu | cuda
    oversubscribe: float = 4.0  # the embedded cluster runs at most this many worker CPUs (workers × cpus_per_worker) per host core
    env: dict[str, str] = field(default_factory=dict)  # every rank's environment (Ray runtime_env): NCCL_SOCKET_IFNAME, ...
    placement: str = "pack"  # pack | spread | strict_pack | strict_spread: Ray's placement of the ranks' bundles
    placement_timeout_s: float = 600.0  # the ranks' resources must be free within this; else the job fails, saying why
    torch_threads: int | None = None  # None: cpus_per_worker


@dataclass
class ModelSection:
    arch: str = "transformer"
    preset: str = "tiny"
    # "hf:DIR": start from a local transformers Llama / Qwen2 checkpoint (its shapes, weights and tokenizer)
    init_from: str | None = None
    # Any further key under `model:` overrides a field of the architecture's config dataclass.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    dp: int | None = None  # None: cluster.workers / (tp * pp * cp)
    cp: int = 1
    ep: int = 1
    zero: int = 1
    sequence_parallel: bool = False
    pipeline_partition: str = "parameters"  # parameters | uniform: how blocks are split into pp stages


@dataclass
class DataSection:
    shards: str | None = None  # None: a cache directory derived from corpus, vocab_size and seq_len
    corpus: str | None = "builtin"  # builtin | a path | null (shards must already exist)
    tokenizer: str | None = None  # an existing tokenizer.json instead of training one
    vocab_size: int = 8192
    seq_len: int = 128
    micro_batch: int = 8
    global_batch: int = 16
    num_workers: int = 0  # dataloader worker processes per rank
    samples_per_shard: int = 2048
    eval_samples: int = 256
    record_samples: bool = False  # each rank appends the sample ids of every step to workers/samples_rank<R>.jsonl
    verify_upfront_mb: float = 1024.0  # shard sets up to this size are checksummed by the driver before any worker starts (0: never; ranks always verify each shard they open)


@dataclass
class OptimSection:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    # lookup tables with sparse gradients (an arch's ModelSpec.table_params: MemoryFormer's hash tables)
    table_lr_multiplier: float = 1.0  # their lr = lr × this (the MemoryFormer paper triples lr globally instead)
    table_weight_decay: float | None = None  # None: optim.weight_decay (the code's 0.1); 0: no decay on tables
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class TrainSection:
    steps: int = 100
    eval_every: int = 25
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    output_dir: str = "runs"
    seed: int = 0
    log_every: int = 1
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16 | fp16
    activation_checkpointing: bool = False  # recompute each block's activations in backward (pipeline stages)


@dataclass
class TrackingSection:
    uri: str | None = None  # None: sqlite store under train.output_dir
    experiment: str = "lmforge"
    system_metrics: bool = True
    probe_timeout_s: float = 5.0  # an http(s) tracking server must answer its health check within this, before any worker starts


@dataclass
class FaultSection:
    max_restarts: int = 3
    hang_timeout_s: float = 600.0
    nonfinite: str = "skip_step"  # skip_step | stop
    restart_backoff_s: float = 1.0  # the n-th restart of a driver session waits restart_backoff_s * 2**(n-1), at most 60 s
    checkpoint_errors: str = "fail"  # fail | continue (a failed intermediate checkpoint is logged and training goes on)
    elastic: bool = False  # a node lost: true resumes on the capacity left (fewer DP ranks); false waits for it to return
    node_wait_s: float = 600.0  # how long a job that lost a node waits for capacity before it fails


@dataclass
class JobSpec:
    cluster: ClusterSection = field(default_factory=ClusterSection)
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    fault: FaultSection = field(default_factory=FaultSection)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {"arch": self.model.arch, "preset": self.model.preset, **self.model.overrides}
        if self.model.init_from is not None:
            d["model"]["init_from"] = self.model.init_from
        return d

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except SpecError:
                pass
        raise SpecError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(key, f"expected a mapping, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SpecError(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [v if item is Any else _coerce(v, item, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise SpecError(key, f"expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return getattr(tp, "__name__", str(tp))


def _section_from_dict(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(path, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is ModelSection:
        # Unknown keys under model: become architecture overrides, validated against the arch's config.
        known = {k: v for k, v in data.items() if k in ("arch", "preset", "init_from")}
        extra = {k: v for k, v in data.items() if k not in ("arch", "preset", "init_from")}
        extra.update(extra.pop("overrides", None) or {})
        out = cls(**{k: _coerce(v, hints[k], f"{path}.{k}") for k, v in known.items()})
        out.overrides = extra
        return out
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise SpecError(f"{path}.{k}", f"unknown key; allowed keys in {path}: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], f"{path}.{k}")
    return cls(**kwargs)


SECTIONS = {f.name: f.type for f in dataclasses.fields(JobSpec)}


def spec_from_dict(data: Any) -> JobSpec:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError("<root>", f"a job spec is a mapping of sections, got {type(data).__name__}")
    hints = typing.get_type_hints(JobSpec)
    kwargs = {}
    for name, value in data.items():
        if name not in hints:
            raise SpecError(name, f"unknown section; allowed sections: {', '.join(hints)}")
        kwargs[name] = _section_from_dict(hints[name], value, name)
    return JobSpec(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` strings; values are parsed as YAML scalars (`3`, `1e-3`, `true`, `null`)."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(item, "an override must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise SpecError(key, "an override key must be section.key, e.g. train.steps=50")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise SpecError(key, f"cannot parse value {raw!r}: {e}") from None
        section = data.setdefault(parts[0], {})
        if section is None:
            section = data[parts[0]] = {}
        if not isinstance(section, dict):
            raise SpecError(parts[0], "expected a mapping")
        section[parts[1]] = value
    return data


def load_spec(path: str | Path | None, overrides: list[str] = ()) -> JobSpec:
    """Read a YAML spec (or start from defaults when `path` is None) and apply overrides."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SpecError(str(path), "no such job spec file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SpecError(str(path), f"not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise SpecError(str(path), "a job spec is a mapping of sections")
    return spec_from_dict(apply_overrides(data, list(overrides)))


def dump_spec(spec: JobSpec, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    tmp.replace(path)
