"""Cross-field checks of a job spec, run before any worker starts.

Every message names the key path and what is allowed, and shows the arithmetic for layouts.
"""
from __future__ import annotations

from pathlib import Path

from launcher.errors import SpecError
from launcher.spec import JobSpec

CHOICES = {
    "cluster.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "fp32", "bf16", "fp16"),
    "fault.nonfinite": ("skip_step", "stop"),
    "fault.checkpoint_errors": ("fail", "continue"),
    "parallel.zero": (0, 1, 2),
    "parallel.pipeline_partition": ("parameters", "uniform"),
    "cluster.placement": ("pack", "spread", "strict_pack", "strict_spread"),
}

# Layout degrees whose implementation has not landed yet: refused with the reason, never ignored.
NOT_YET: dict[str, str] = {}

# Beyond these a value is a typo, not a job (10**12 steps would take longer than anyone waits).
AT_MOST = {
    "train.steps": 10**9, "cluster.workers": 65536, "cluster.cpus_per_worker": 1024, "data.seq_len": 2**20,
    "data.vocab_size": 2**24, "data.micro_batch": 2**20, "data.global_batch": 2**26, "parallel.tp": 1024,
    "parallel.pp": 1024, "parallel.cp": 1024, "parallel.ep": 65536, "parallel.dp": 65536,
    "fault.max_restarts": 1000, "train.keep_checkpoints": 10000,
}


def _get(spec: JobSpec, key: str):
    section, name = key.split(".")
    return getattr(getattr(spec, section), name)


def _positive(spec: JobSpec, keys: list[str], minimum: float) -> None:
    for key in keys:
        v = _get(spec, key)
        if v is not None and v < minimum:
            raise SpecError(key, f"must be >= {minimum:g}, got {v}")


def data_parallel_size(spec: JobSpec) -> int:
    """dp from the spec, or derived from the worker count; raises with the arithmetic if it does not fit."""
    p, w = spec.parallel, spec.cluster.workers
    model_ranks = p.tp * p.pp * p.cp
    if p.dp is None:
        if w % model_ranks:
            raise SpecError(
                "cluster.workers",
                f"{w} workers cannot be split into tp×pp×cp = {p.tp}×{p.pp}×{p.cp} = {model_ranks} model ranks "
                f"(workers must be a multiple of {model_ranks})",
            )
        return w // model_ranks
    world = model_ranks * p.dp
    if world != w:
        raise SpecError(
            "cluster.workers",
            f"world size = tp×pp×dp×cp = {p.tp}×{p.pp}×{p.dp}×{p.cp} = {world}, but cluster.workers = {w}",
        )
    return p.dp


def validate(spec: JobSpec, address: str | None = None) -> None:
    """Raise SpecError for the first problem found. `address`: the cluster the job will run on (the
    resolved one, `launcher.cluster.resolve_address`); without one, the device is checked on this host."""
    for key, allowed in CHOICES.items():
        v = _get(spec, key)
        if v not in allowed:
            raise SpecError(key, f"got {v!r}; allowed: {', '.join(map(str, allowed))}")
    _positive(spec, ["cluster.workers", "cluster.cpus_per_worker", "cluster.torch_threads"], 1)
    _positive(spec, ["parallel.tp", "parallel.pp", "parallel.dp", "parallel.cp", "parallel.ep"], 1)
    _positive(spec, ["data.vocab_size"], 256)
    _positive(spec, ["data.seq_len"], 2)
    _positive(spec, ["data.micro_batch", "data.global_batch", "data.samples_per_shard", "data.eval_samples"], 1)
    _positive(spec, ["data.num_workers"], 0)
    _positive(spec, ["train.steps", "train.keep_checkpoints", "train.log_every"], 1)
    _positive(spec, ["train.eval_every", "train.checkpoint_every", "optim.warmup_steps"], 0)
    _positive(spec, ["optim.weight_decay", "optim.grad_clip", "optim.min_lr_ratio", "fault.max_restarts"], 0)
    _positive(spec, ["fault.hang_timeout_s"], 1)
    _positive(spec, ["fault.restart_backoff_s", "fault.node_wait_s"], 0)
    _positive(spec, ["cluster.placement_timeout_s"], 1)
    _positive(spec, ["tracking.probe_timeout_s", "cluster.oversubscribe"], 0.001)
    _positive(spec, ["data.verify_upfront_mb"], 0)
    for key, most in AT_MOST.items():
        v = _get(spec, key)
        if v is not None and v > most:
            raise SpecError(key, f"{v} is beyond the largest value allowed ({most:,})")
    if not spec.optim.lr > 0:
        raise SpecError("optim.lr", f"must be > 0, got {spec.optim.lr}")
    if spec.optim.min_lr_ratio > 1:
        raise SpecError("optim.min_lr_ratio", f"must be in [0, 1], got {spec.optim.min_lr_ratio}")
    _validate_tables(spec)
    for key in ("optim.beta1", "optim.beta2"):
        if not 0 <= _get(spec, key) < 1:
            raise SpecError(key, f"must be in [0, 1), got {_get(spec, key)}")
    for k, v in (spec.cluster.env or {}).items():
        if not isinstance(k, str) or not k or "=" in k or not isinstance(v, (str, int, float, bool)):
            raise SpecError(f"cluster.env.{k}", f"an environment variable name and a scalar value, got {k!r}: {v!r}")
    if not (address or spec.cluster.address) and spec.cluster.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SpecError("cluster.device", "cuda requested but this machine has no CUDA device; allowed here: auto, cpu")

    for key, what in NOT_YET.items():
        if _get(spec, key) != 1:
            raise SpecError(key, f"{what} is not available in this version; allowed: 1")
    dp = data_parallel_size(spec)
    d = spec.data
    per_step = d.micro_batch * dp
    if d.global_batch % per_step:
        raise SpecError(
            "data.global_batch",
            f"{d.global_batch} is not a multiple of data.micro_batch × dp = {d.micro_batch} × {dp} = {per_step}",
        )
    _validate_model(spec)
    _validate_layout(spec, dp)


def _validate_tables(spec: JobSpec) -> None:
    """The lookup-table options need a model that declares tables (ModelSpec.table_params)."""
    import models

    o = spec.optim
    if not o.table_lr_multiplier > 0:
        raise SpecError("optim.table_lr_multiplier", f"must be > 0, got {o.table_lr_multiplier}")
    if o.table_weight_decay is not None and not o.table_weight_decay >= 0:
        raise SpecError("optim.table_weight_decay", f"must be >= 0 (or unset: optim.weight_decay), got {o.table_weight_decay}")
    try:
        tables = models.get_spec(spec.model.arch).table_params
    except ValueError:
        return  # an unknown arch is _validate_model's to report
    for key, unset in (("optim.table_lr_multiplier", 1.0), ("optim.table_weight_decay", None)):
        if tables is None and _get(spec, key) != unset:
            raise SpecError(key, f"applies to lookup tables and model arch {spec.model.arch!r} declares none; "
                                 f"allowed: {unset if unset is not None else 'unset'}")


def _validate_layout(spec: JobSpec, dp: int) -> None:
    """Heads, vocabulary, widths and layers against tp/pp, from the model's shapes (nothing is built)."""
    from parallel.plan import Layout, LayoutError, Workload, validate_layout

    p, d = spec.parallel, spec.data
    layout = Layout(tp=p.tp, pp=p.pp, dp=dp, cp=p.cp, zero=p.zero, sequence_parallel=p.sequence_parallel,
                    partition=p.pipeline_partition, ep=p.ep)
    work = Workload(seq_len=d.seq_len, micro_batch=d.micro_batch, grad_accum=d.global_batch // (d.micro_batch * dp))
    try:
        validate_layout(model_config(spec, vocab_size=d.vocab_size), layout, work)
    except LayoutError as e:
        raise SpecError(e.key, str(e).removeprefix(f"{e.key}: ")) from None


def make_spec_plan(spec: JobSpec, cuda: bool, peak_tflops: float | None = None, mfu: float = 0.4):
    """`launcher plan`'s Plan for a validated spec: parameters, memory and FLOPs per rank of its layout."""
    import torch

    from parallel.plan import Layout, LayoutError, Workload, make_plan
    from parallel.precision import resolve_dtype

    p, d = spec.parallel, spec.data
    dp = data_parallel_size(spec)
    layout = Layout(tp=p.tp, pp=p.pp, dp=dp, cp=p.cp, zero=p.zero, sequence_parallel=p.sequence_parallel,
                    partition=p.pipeline_partition, ep=p.ep)
    work = Workload(seq_len=d.seq_len, micro_batch=d.micro_batch, grad_accum=d.global_batch // (d.micro_batch * dp),
                    dtype=resolve_dtype(spec.train.dtype, torch.device("cuda" if cuda else "cpu")))
    try:
        return make_plan(model_config(spec, vocab_size=d.vocab_size), layout, work, peak_tflops=peak_tflops, mfu=mfu)
    except LayoutError as e:
        raise SpecError(e.key, str(e).removeprefix(f"{e.key}: ")) from None


def validate_local_machine(spec: JobSpec) -> None:
    """For the embedded cluster (it runs every rank on this host): the workers' CPUs within
    `cluster.oversubscribe` per core, and on CPU the plan's memory of all ranks within the host's RAM."""
    import os

    import psutil

    c = spec.cluster
    cores = os.cpu_count() or 1
    need, cap = c.workers * c.cpus_per_worker, cores * c.oversubscribe
    if need > cap:
        raise SpecError("cluster.workers", f"{c.workers} workers × {c.cpus_per_worker} cpus_per_worker = {need} CPUs, "
                                           f"but the embedded cluster runs on this host: {cores} cores × "
                                           f"cluster.oversubscribe {c.oversubscribe:g} = {cap:g}; pass --address to "
                                           "use a Ray cluster")
    if c.device == "cuda":
        return  # device memory: `launcher plan` per GPU, not the host's RAM
    plan = make_spec_plan(spec, cuda=False)
    ckpt = spec.train.activation_checkpointing
    per_rank = [s.total_checkpointed_bytes if ckpt else s.total_bytes for s in plan.stages]
    ranks = c.workers // len(plan.stages)
    total, ram = sum(per_rank) * ranks, psutil.virtual_memory().total
    if total > ram:
        gib = 2**30
        raise SpecError("model.preset", f"{spec.model.arch} {spec.model.preset} needs {max(per_rank) / gib:.2f} GiB per "
                                        f"rank (launcher plan) × {c.workers} ranks = {total / gib:.1f} GiB, more than "
                                        f"this host's {ram / gib:.1f} GiB of RAM")


def _validate_model(spec: JobSpec) -> None:
    import models

    if spec.model.arch not in models.names():
        raise SpecError("model.arch", f"unknown architecture {spec.model.arch!r}; allowed: {', '.join(models.names())}")
    presets = models.get_spec(spec.model.arch).presets
    if spec.model.preset not in presets:
        raise SpecError("model.preset", f"unknown preset {spec.model.preset!r} for {spec.model.arch}; allowed: {', '.join(presets)}")
    _validate_init_from(spec)
    try:
        cfg = model_config(spec, vocab_size=spec.data.vocab_size)
    except (ValueError, TypeError) as e:
        raise SpecError("model", str(e)) from None
    if cfg.max_seq_len < spec.data.seq_len:  # e.g. a learned position table shorter than the samples
        raise SpecError("model.max_seq_len", f"{cfg.max_seq_len} is shorter than data.seq_len ({spec.data.seq_len}); "
                                             f"allowed: >= {spec.data.seq_len}")


def init_from_dir(spec: JobSpec) -> Path | None:
    """The local transformers directory of `model.init_from: hf:DIR`, or None."""
    src = spec.model.init_from
    return Path(src.removeprefix("hf:")).expanduser() if src else None


def _validate_init_from(spec: JobSpec) -> None:
    """`hf:DIR` of a supported transformers checkpoint with its tokenizer, for the Transformer++ only."""
    from models import hf_interop

    src = spec.model.init_from
    if src is None:
        return
    if not src.startswith("hf:") or src == "hf:":
        raise SpecError("model.init_from", f"got {src!r}; allowed: hf:DIR (a local transformers checkpoint directory)")
    if spec.model.arch != "transformer":
        raise SpecError("model.init_from", f"hf checkpoints load into the Transformer++ (Llama, Qwen2); "
                                           f"model.arch is {spec.model.arch!r}; allowed: transformer")
    directory = init_from_dir(spec)
    try:
        hf_interop.transformer_fields(hf_interop.read_config(directory))
    except (hf_interop.HFFormatError, ValueError, KeyError) as e:
        raise SpecError("model.init_from", str(e)) from None
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.is_file():
        raise SpecError("model.init_from", f"{directory} has no tokenizer.json: the data are tokenized with the "
                                           "checkpoint's own tokenizer")
    given = spec.data.tokenizer
    if given is not None and Path(given).expanduser().resolve() != tokenizer.resolve():
        raise SpecError("data.tokenizer", f"{given}: with model.init_from the tokenizer is {tokenizer}; "
                                          "allowed: unset or that file")


def model_config(spec: JobSpec, vocab_size: int):
    """The architecture's config for this spec (vocab from the data, context from data.seq_len); with
    `model.init_from: hf:DIR` the checkpoint's shapes and vocabulary win over the preset and the data."""
    import models
    from models import hf_interop

    overrides = _typed_overrides(spec.model.arch, spec.model.overrides)
    overrides.setdefault("max_seq_len", spec.data.seq_len)
    directory = init_from_dir(spec)
    if directory is not None:
        fields = hf_interop.transformer_fields(hf_interop.read_config(directory))
        vocab_size = fields.pop("vocab_size")
        overrides |= fields
    return models.make_config(spec.model.arch, spec.model.preset, vocab_size=vocab_size, **overrides)


def _typed_overrides(arch: str, overrides: dict) -> dict:
    """`model.<field>` values checked against the arch config's annotations, with the spec's own
    coercions (YAML 1.1 and `--set` read `1e30` as a string)."""
    import typing

    import models
    from launcher.spec import _coerce

    hints = typing.get_type_hints(models.get_spec(arch).config_cls)
    return {k: _coerce(v, hints[k], f"model.{k}") if k in hints else v for k, v in overrides.items()}
