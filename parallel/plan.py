"""What a layout costs per rank before any process starts: parameters, memory and FLOPs.

Pure arithmetic over a model config and a layout, agreeing with how the real code shards:
TP by the arch's `tp_plan` applied to the meta model's shapes (`apply_tp.py`); PP by
`stage_bounds` over the TP-sharded block sizes (`parallelize.py` shards first, then cuts
blocks); a tied block counted on every stage that holds it; ZeRO partitions over dp×cp,
DeepSpeed's data-parallel group (`mpu.py`).

`Plan.to_dict()` is what `launcher plan --json` prints:
  params_total (int, tied weights once), flops_per_token (training, whole model),
  flops_per_step (whole job), tokens_per_step,
  layout {tp, pp, dp, cp, world, zero, sequence_parallel, partition},
  workload {seq_len, micro_batch, grad_accum, global_batch, dtype},
  stages [one per pipeline stage; every rank of a stage (all its TP shards and dp/cp replicas)
          holds the same amounts]: {stage, ranks [first, last], blocks [first, end), layers,
          params, weights_bytes, grads_bytes, optimizer_bytes, in_flight_microbatches,
          activations_bytes, activations_checkpointed_bytes, total_bytes,
          total_checkpointed_bytes, flops_per_token, flops_per_step},
  step_time_s, tokens_per_s, peak_tflops, mfu (null unless a peak was given).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import models
from models.contract import ContextParallelCore, ExpertBank, num_experts
from models.registry import PipeBlock
from parallel.apply_tp import has_region_styles, matched_styles
from parallel.tp_styles import ShardError

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class LayoutError(ValueError):
    """A layout the real code would refuse or break on; `key` is the spec key to change."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    partition: str = "parameters"
    ep: int = 1  # experts sharded over ep ranks of the dp×cp plane (not a factor of the world size)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.cp


@dataclass(frozen=True)
class Workload:
    seq_len: int
    micro_batch: int
    grad_accum: int = 1
    dtype: torch.dtype = torch.float32


@dataclass
class StagePlan:
    stage: int
    ranks: list[int]
    blocks: list[int]
    layers: int
    params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    in_flight_microbatches: int
    activations_bytes: int
    activations_checkpointed_bytes: int
    total_bytes: int
    total_checkpointed_bytes: int
    flops_per_token: float
    flops_per_step: float


@dataclass
class Plan:
    params_total: int
    flops_per_token: float
    flops_per_step: float
    tokens_per_step: int
    layout: dict
    workload: dict
    stages: list[StagePlan] = field(default_factory=list)
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    peak_tflops: float | None = None
    mfu: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def meta_model(cfg) -> nn.Module:  # noqa: ANN001 - any registered arch's config
    with torch.device("meta"):
        return models.build(cfg)


def tp_shard_sizes(model: nn.Module, plan: dict | None, tp: int) -> dict[int, int]:
    """Elements one TP rank holds of each parameter, keyed by id (tied weights appear once): each
    matched module's style object says what it splits (`parallel/tp_styles.py`), the same object the
    real swap applies; anything the plan does not name stays replicated."""
    sizes = {id(p): p.numel() for p in model.parameters()}
    if tp == 1:
        return sizes
    if not plan:
        raise LayoutError("parallel.tp", "this model arch declares no tensor-parallel plan; allowed: 1")
    for name, module, style in matched_styles(model, plan):
        try:
            local = style.local_sizes(module, tp, name)
        except ShardError as e:
            raise LayoutError("parallel.tp", str(e)) from None
        for pname, n in local.items():
            sizes[id(getattr(module, pname))] = n
    return sizes


class _Sized(nn.Module):
    """Stands in for a block in `stage_bounds`, weighing what the block holds after TP."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n, device="meta"))


def _block_params(block: PipeBlock) -> list[nn.Parameter]:
    return list(block.module.parameters())  # deduplicated: a tied pair counts once per block


def stage_blocks(blocks: list[PipeBlock], sizes: dict[int, int], pp: int, method: str) -> list[int]:
    """Stage boundaries over `blocks` as the real pipeline cuts them (over TP-sharded sizes)."""
    if pp == 1:
        return [0, len(blocks)]
    from parallel.pipeline import stage_bounds

    stand_ins = [PipeBlock(_Sized(sum(sizes[id(p)] for p in _block_params(b)))) for b in blocks]
    try:
        return stage_bounds(stand_ins, pp, method)
    except ValueError as e:
        raise LayoutError("parallel.pp", str(e)) from None


def _block_forward_flops(blocks: list[PipeBlock], seq_len: int) -> list[float] | None:
    """Forward FLOPs of each block for one sequence, counted on the meta model (no memory, no time);
    None when an arch's forward cannot run on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    out = []
    try:
        with torch.no_grad():
            for b in blocks:
                with FlopCounterMode(display=False) as counter:
                    x = b.forward(b.module, x) if b.forward is not None else b.module(x)
                    x = x[0] if isinstance(x, tuple) else x
                out.append(float(counter.get_total_flops()))
    except Exception:  # noqa: BLE001 - the caller falls back to a split by parameters
        return None
    return out


def layer_activation_bytes(cfg, work: Workload, layout: Layout, checkpointed: bool) -> float:  # noqa: ANN001
    """Activations one transformer layer keeps for backward, per micro-batch (Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models", eqs. 1-5), 16-bit bytes:

      no recomputation, no TP:       s·b·h·(34 + 5·a·s/h)
      TP t, no SP:                   s·b·h·(10 + 24/t + 5·a·s/(h·t))
      TP t with SP:                  s·b·h·(34 + 5·a·s/h) / t
      full recomputation:            2·s·b·h (÷ t with SP): only each layer's input is kept

    scaled by bytes-per-element/2 for fp32. s is the sequence per rank (seq_len/cp), h = d_model,
    a = n_heads. The formula is the paper's GPT block (4h MLP, dropout masks, stored attention
    scores); our SwiGLU blocks have no dropout and SDPA's fused kernels drop the 5·a·s/h score
    term on GPU, so read it as an upper bound.
    """
    dims = models.get_spec(cfg.arch).dims(cfg)
    s, b, h, a, t = work.seq_len / layout.cp, work.micro_batch, dims.hidden, dims.heads, layout.tp
    scale = DTYPE_BYTES[work.dtype] / 2
    if checkpointed:
        return 2 * s * b * h / (t if layout.sequence_parallel else 1) * scale
    if layout.sequence_parallel:
        return s * b * h * (34 + 5 * a * s / h) / t * scale
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) * scale


def output_activation_bytes(cfg, work: Workload, layout: Layout) -> float:  # noqa: ANN001
    """The last stage's head and loss, per micro-batch (same paper, sec. 4.3): 4·s·b·h/t in 16-bit for
    the final norm and the head's input, plus the logits kept in fp32 by the cross-entropy, 4·s·b·v/t."""
    dims = models.get_spec(cfg.arch).dims(cfg)
    s, b, t = work.seq_len / layout.cp, work.micro_batch, layout.tp
    return (4 * s * b * dims.hidden * DTYPE_BYTES[work.dtype] / 2 + 4 * s * b * dims.vocab) / t


def optimizer_bytes_per_param(dtype: torch.dtype) -> int:
    """AdamW: two fp32 moments, plus an fp32 master copy when the model computes in 16 bits."""
    return 8 + (4 if DTYPE_BYTES[dtype] < 4 else 0)


def check_layout(cfg, layout: Layout, work: Workload) -> None:  # noqa: ANN001
    """What the real code refuses or breaks on, from the config and the arch's declarations alone."""
    spec = models.get_spec(cfg.arch)
    if layout.sequence_parallel and layout.tp == 1:
        raise LayoutError("parallel.sequence_parallel", "shards activations over the TP group: it needs tp > 1")
    if layout.pp > 1 and layout.zero > 1:
        raise LayoutError("parallel.zero", f"pipeline parallelism allows ZeRO stage 0 or 1 (DeepSpeed's pipeline engine), got {layout.zero}")
    if layout.tp > 1:
        for name, count in spec.tp_units(cfg).items():  # e.g. heads: TP splits them whole
            if count % layout.tp:
                raise LayoutError("parallel.tp", f"{name}={count} is not divisible by tp={layout.tp} "
                                                 f"({count} % {layout.tp} = {count % layout.tp}): TP splits whole heads")
    if work.seq_len % layout.cp:
        raise LayoutError("parallel.cp", f"data.seq_len={work.seq_len} is not divisible by cp={layout.cp}")
    if layout.cp > 1 and spec.cp_core is None:
        raise LayoutError("parallel.cp", f"model arch {cfg.arch!r} has no context-parallel core; allowed: 1")
    if layout.ep > 1:
        _check_expert_layout(cfg, spec, layout)
    if spec.layout_refusal is not None:
        refused = spec.layout_refusal(cfg, {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "cp": layout.cp,
                                            "ep": layout.ep, "sp": int(layout.sequence_parallel)})
        if refused is not None:
            raise LayoutError(*refused)
    if layout.sequence_parallel and (work.seq_len // layout.cp) % layout.tp:
        raise LayoutError("parallel.sequence_parallel", f"the sequence per rank ({work.seq_len // layout.cp}) is not divisible by tp={layout.tp}")
    if layout.sequence_parallel and has_region_styles(spec.tp_plan):
        raise LayoutError("parallel.sequence_parallel", f"model arch {cfg.arch!r} has mixture-of-experts TP regions, "
                                                        "which do not run on sequence shards; allowed: false")


def _check_expert_layout(cfg, spec: models.ModelSpec, layout: Layout) -> None:  # noqa: ANN001
    if spec.expert_bank is None:
        raise LayoutError("parallel.ep", f"model arch {cfg.arch!r} has no experts to shard; allowed: 1")
    plane = layout.dp * layout.cp
    if plane % layout.ep:
        raise LayoutError("parallel.ep", f"ep={layout.ep} must divide dp×cp = {layout.dp}×{layout.cp} = {plane} "
                                         "(experts are sharded over data-parallel ranks)")
    if layout.pp > 1:
        raise LayoutError("parallel.ep", "expert parallelism inside pipeline stages is not implemented; "
                                         "allowed with pp > 1: 1")
    if layout.tp > 1:
        raise LayoutError("parallel.ep", "expert parallelism with tensor parallelism is not implemented; "
                                         "allowed with tp > 1: 1")


def _matching(model: nn.Module, pattern: str | None) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if pattern is not None and fnmatch.fnmatchcase(n, pattern)]


def _cores(model: nn.Module, spec: models.ModelSpec, key: str, pattern: str | None, protocol: type,
           what: str) -> list[tuple[str, nn.Module]]:
    """The meta model's modules matching `pattern`, each checked to implement `protocol`."""
    found = _matching(model, pattern)
    if not found:
        raise LayoutError(key, f"model arch {spec.name!r} has no module matching its {what} {pattern!r}; allowed: 1")
    for name, module in found:
        if not isinstance(module, protocol):
            raise LayoutError(key, f"{name} ({type(module).__name__}) does not implement the {what} protocol; allowed: 1")
    return found


def check_cores(model: nn.Module, spec: models.ModelSpec, layout: Layout, work: Workload) -> None:
    """The swappable cores of the meta model against the layout: they implement their protocol, and
    their own sizes (halo, expert count) fit."""
    if layout.cp > 1:
        cores = _cores(model, spec, "parallel.cp", spec.cp_core, ContextParallelCore, "context-parallel core")
        halo = max(core.halo for _, core in cores)
        if work.seq_len // layout.cp < halo:
            raise LayoutError("parallel.cp", f"{work.seq_len // layout.cp} tokens per rank (data.seq_len={work.seq_len} / "
                                             f"cp={layout.cp}) is shorter than the context-parallel core's {halo}-token halo")
    if layout.ep > 1:
        for name, bank in _cores(model, spec, "parallel.ep", spec.expert_bank, ExpertBank, "expert bank"):
            experts = num_experts(bank)
            if experts % layout.ep:
                raise LayoutError("parallel.ep", f"n_experts={experts} (of {name}) is not divisible by ep={layout.ep} "
                                                 f"({experts} % {layout.ep} = {experts % layout.ep})")


def expert_shard_sizes(model: nn.Module, pattern: str | None, ep: int, sizes: dict[int, int]) -> dict[int, int]:
    """`sizes` with the expert banks' parameters divided over ep ranks."""
    if ep == 1 or pattern is None:
        return sizes
    out = dict(sizes)
    for _, bank in _matching(model, pattern):
        for pname in bank.expert_parameters():
            p = getattr(bank, pname)
            out[id(p)] = sizes[id(p)] // ep
    return out


def _blocks(spec: models.ModelSpec, model: nn.Module, layout: Layout) -> list[PipeBlock]:
    if spec.pipeline_blocks is None:
        if layout.pp > 1:
            raise LayoutError("parallel.pp", f"model arch {spec.name!r} declares no pipeline blocks; allowed: 1")
        return [PipeBlock(model)]
    blocks = spec.pipeline_blocks(model)
    if len(blocks) < layout.pp:
        raise LayoutError("parallel.pp", f"pp={layout.pp} stages but the model has only {len(blocks)} pipeline blocks "
                                         f"({sum(b.layer for b in blocks)} of them layers)")
    return blocks


def validate_layout(cfg, layout: Layout, work: Workload) -> None:  # noqa: ANN001
    """Everything about `layout` the real code would refuse, from shapes alone (a meta model)."""
    check_layout(cfg, layout, work)
    spec = models.get_spec(cfg.arch)
    model = meta_model(cfg)
    check_cores(model, spec, layout, work)
    tp_shard_sizes(model, spec.tp_plan, layout.tp)
    _blocks(spec, model, layout)


def make_plan(cfg, layout: Layout, work: Workload, *, peak_tflops: float | None = None, mfu: float = 0.4) -> Plan:  # noqa: ANN001
    """Per-stage parameters, memory and FLOPs of `cfg` trained under `layout`; see the module docstring."""
    check_layout(cfg, layout, work)
    spec = models.get_spec(cfg.arch)
    model = meta_model(cfg)
    check_cores(model, spec, layout, work)
    sizes = expert_shard_sizes(model, spec.expert_bank, layout.ep, tp_shard_sizes(model, spec.tp_plan, layout.tp))
    blocks = _blocks(spec, model, layout)
    bounds = stage_blocks(blocks, sizes, layout.pp, layout.partition)

    params_total = spec.num_params(cfg) if spec.num_params else sum(p.numel() for p in model.parameters())
    fwd = _block_forward_flops(blocks, work.seq_len) or [float(sum(sizes[id(p)] for p in _block_params(b))) for b in blocks]
    fpt = spec.flops_per_token(cfg, work.seq_len) if spec.flops_per_token else 3 * sum(fwd) / work.seq_len
    tokens_per_step = work.seq_len * work.micro_batch * work.grad_accum * layout.dp
    nbytes = DTYPE_BYTES[work.dtype]
    zero_group = layout.dp * layout.cp
    per_stage_ranks = layout.world // layout.pp  # pp is the slowest axis of the rank grid
    plan = Plan(params_total=params_total, flops_per_token=fpt, flops_per_step=fpt * tokens_per_step,
                tokens_per_step=tokens_per_step, layout={**asdict(layout), "world": layout.world},
                workload={**asdict(work), "global_batch": work.micro_batch * work.grad_accum * layout.dp,
                          "dtype": str(work.dtype).removeprefix("torch.")})
    for s in range(layout.pp):
        own = blocks[bounds[s]:bounds[s + 1]]
        unique = {id(p) for b in own for p in _block_params(b)}
        params = sum(sizes[i] for i in unique)
        layers = sum(b.layer for b in own)  # applications: a shared layer run twice keeps two sets of activations
        in_flight = min(layout.pp - s, work.grad_accum)  # 1F1B: stage s holds pp - s micro-batches at most
        head = output_activation_bytes(cfg, work, layout) if s == layout.pp - 1 else 0.0
        full = layer_activation_bytes(cfg, work, layout, checkpointed=False)
        act = in_flight * (layers * full + head)
        # Checkpointed: each layer's input per micro-batch, plus one layer rebuilt in full during its backward.
        act_ckpt = in_flight * (layers * layer_activation_bytes(cfg, work, layout, checkpointed=True) + head) + (full if layers else 0)
        weights = params * nbytes
        grads = math.ceil(params / (zero_group if layout.zero >= 2 else 1)) * nbytes
        optim = math.ceil(params / (zero_group if layout.zero >= 1 else 1)) * optimizer_bytes_per_param(work.dtype)
        stage_fpt = fpt * sum(fwd[bounds[s]:bounds[s + 1]]) / sum(fwd) / layout.tp
        plan.stages.append(StagePlan(
            stage=s, ranks=[s * per_stage_ranks, (s + 1) * per_stage_ranks - 1], blocks=bounds[s:s + 2], layers=layers,
            params=params, weights_bytes=weights, grads_bytes=grads, optimizer_bytes=optim,
            in_flight_microbatches=in_flight, activations_bytes=round(act), activations_checkpointed_bytes=round(act_ckpt),
            total_bytes=weights + grads + optim + round(act), total_checkpointed_bytes=weights + grads + optim + round(act_ckpt),
            flops_per_token=stage_fpt, flops_per_step=stage_fpt * tokens_per_step / layout.dp / layout.cp,
        ))
    if peak_tflops:
        # The slowest stage sets the pace; 1F1B idles (pp-1) micro-batch slots per step (the bubble).
        busy = max(st.flops_per_step for st in plan.stages) / (peak_tflops * 1e12 * mfu)
        plan.step_time_s = busy * (1 + (layout.pp - 1) / work.grad_accum)
        plan.tokens_per_s = tokens_per_step / plan.step_time_s
        plan.peak_tflops, plan.mfu = peak_tflops, mfu
    return plan
