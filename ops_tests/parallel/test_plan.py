"""`parallel/plan.py` against the real code: per-rank parameter counts equal those of TP-sharded
modules (2 gloo ranks) and of the blocks `stage_bounds` gives each pipeline stage; memory and FLOPs
follow the documented arithmetic."""
from __future__ import annotations

import math

import pytest
import torch

import models
from parallel.plan import Layout, LayoutError, Workload, layer_activation_bytes, make_plan, meta_model, tp_shard_sizes
from spawn_ranks import spawn_ranks

SEQ = 16
METHODS = ("parameters", "uniform")


def _cfg(tie: bool):
    return models.make_config("transformer", "tiny", vocab_size=128, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                              max_seq_len=SEQ, tie_embeddings=tie)


def _stage_counts(model: torch.nn.Module, pp: int, method: str) -> list[int]:
    """Unique parameters of the blocks each stage owns, as the real pipeline cuts them."""
    from parallel.pipeline import stage_bounds

    blocks = models.get_spec("transformer").pipeline_blocks(model)
    bounds = stage_bounds(blocks, pp, method)
    return [sum(p.numel() for p in {id(p): p for b in blocks[bounds[s]:bounds[s + 1]] for p in b.module.parameters()}.values())
            for s in range(pp)]


def _sharded_counts(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from parallel.apply_tp import apply_tensor_parallel

    out = {}
    for tie in (False, True):
        torch.manual_seed(0)
        model = apply_tensor_parallel(models.build(_cfg(tie)), models.get_spec("transformer").tp_plan, dist.group.WORLD)
        out[tie] = {"total": sum(p.numel() for p in model.parameters()),
                    "names": {n: p.numel() for n, p in model.named_parameters()},
                    "stages": {m: _stage_counts(model, 2, m) for m in METHODS}}  # parallelize: TP first, then PP
    return out


def _plan(cfg, **layout):  # noqa: ANN001, ANN202
    return make_plan(cfg, Layout(**layout), Workload(seq_len=SEQ, micro_batch=2, grad_accum=4))


def test_tp_and_tp_pp_params_equal_sharded_modules():
    ranks = spawn_ranks(_sharded_counts, 2)
    for tie in (False, True):
        cfg = _cfg(tie)
        meta = meta_model(cfg)
        sizes = tp_shard_sizes(meta, models.get_spec("transformer").tp_plan, 2)
        planned_names = {n: sizes[id(p)] for n, p in meta.named_parameters()}
        for r in ranks:
            assert r[tie]["names"] == planned_names
            assert _plan(cfg, tp=2).stages[0].params == r[tie]["total"]
            for method in METHODS:
                got = [st.params for st in _plan(cfg, tp=2, pp=2, partition=method).stages]
                assert got == r[tie]["stages"][method], (tie, method)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_pp_stage_params_equal_owned_blocks(tie, method):
    cfg = _cfg(tie)
    torch.manual_seed(0)
    want = _stage_counts(models.build(cfg), 2, method)
    plan = _plan(cfg, pp=2, partition=method)
    assert [st.params for st in plan.stages] == want
    assert plan.params_total == models.get_spec("transformer").num_params(cfg)
    shared = cfg.vocab_size * cfg.d_model if tie else 0  # a tied embedding lives on both stages
    assert sum(want) == plan.params_total + shared


@pytest.mark.parametrize("dtype,per_param", [(torch.float32, 8), (torch.bfloat16, 12)])
def test_zero_partitions_optimizer_and_grads_over_dp(dtype, per_param):
    cfg = _cfg(False)
    nbytes = 4 if dtype == torch.float32 else 2

    def stage(dp: int, zero: int):  # noqa: ANN202
        return make_plan(cfg, Layout(dp=dp, zero=zero), Workload(SEQ, 2, 4, dtype)).stages[0]

    for zero in (0, 1, 2):
        one, two = stage(1, zero), stage(2, zero)
        n = one.params
        assert one.weights_bytes == two.weights_bytes == n * nbytes
        assert one.optimizer_bytes == n * per_param
        assert one.grads_bytes == n * nbytes
        assert two.optimizer_bytes == (math.ceil(n / 2) * per_param if zero >= 1 else n * per_param)
        assert two.grads_bytes == (math.ceil(n / 2) * nbytes if zero >= 2 else n * nbytes)


def test_1p3b_preset_is_sane():
    spec = models.get_spec("transformer")
    cfg = models.make_config("transformer", "1.3b", vocab_size=32000, max_seq_len=2048)
    work = Workload(seq_len=2048, micro_batch=4, grad_accum=8, dtype=torch.bfloat16)
    single = make_plan(cfg, Layout(), work)
    assert single.params_total == spec.num_params(cfg) == single.stages[0].params
    plan = make_plan(cfg, Layout(tp=2, pp=2, dp=2, zero=1), work)
    per_replica = sum(st.params * 2 for st in plan.stages)  # norms are replicated over TP: counted twice here
    assert per_replica == pytest.approx(spec.num_params(cfg), rel=0.01)
    assert plan.flops_per_token == spec.flops_per_token(cfg, 2048)
    assert sum(st.flops_per_token * 2 for st in plan.stages) == pytest.approx(plan.flops_per_token, rel=1e-9)
    assert sum(st.flops_per_step * 2 * 2 for st in plan.stages) == pytest.approx(plan.flops_per_step, rel=1e-9)
    assert plan.flops_per_step == plan.flops_per_token * 2048 * 4 * 8 * 2
    for st in plan.stages:
        assert 0 < st.activations_checkpointed_bytes < st.activations_bytes
        assert st.total_bytes == st.weights_bytes + st.grads_bytes + st.optimizer_bytes + st.activations_bytes
    assert [st.in_flight_microbatches for st in plan.stages] == [2, 1]  # 1F1B: min(pp - stage, grad_accum)


def test_activation_formula_is_the_papers():
    cfg = models.make_config("transformer", "1.3b", vocab_size=32000, max_seq_len=2048)
    s, b, h, a = 2048, 4, cfg.d_model, cfg.n_heads
    work = Workload(seq_len=s, micro_batch=b, dtype=torch.bfloat16)
    assert layer_activation_bytes(cfg, work, Layout(), False) == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    assert layer_activation_bytes(cfg, work, Layout(tp=2), False) == pytest.approx(s * b * h * (10 + 24 / 2 + 5 * a * s / (2 * h)))
    assert layer_activation_bytes(cfg, work, Layout(tp=2, sequence_parallel=True), False) == pytest.approx(s * b * h * (34 + 5 * a * s / h) / 2)
    assert layer_activation_bytes(cfg, work, Layout(tp=2, sequence_parallel=True), True) == pytest.approx(s * b * h)
    fp32 = Workload(seq_len=s, micro_batch=b, dtype=torch.float32)
    assert layer_activation_bytes(cfg, fp32, Layout(), True) == pytest.approx(2 * 2 * s * b * h)
    # Stage 0 of pp=2 keeps two micro-batches in flight; the head's term is the last stage's alone.
    plan = make_plan(cfg, Layout(pp=2), Workload(seq_len=s, micro_batch=b, grad_accum=8, dtype=torch.bfloat16))
    first = plan.stages[0]
    assert first.activations_bytes == round(2 * first.layers * layer_activation_bytes(cfg, work, Layout(pp=2), False))


@pytest.mark.parametrize("layout,key", [
    (dict(tp=3), "parallel.tp"),  # n_heads=4
    (dict(pp=2, zero=2), "parallel.zero"),
    (dict(sequence_parallel=True), "parallel.sequence_parallel"),
    (dict(pp=99), "parallel.pp"),
])
def test_refused_layouts_name_the_key(layout, key):
    with pytest.raises(LayoutError) as info:
        _plan(_cfg(False), **layout)
    assert info.value.key == key and str(info.value).startswith(key)
