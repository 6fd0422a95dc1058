"""Layout equivalence: every layout trains like one process (fp32, gloo): per-step losses for 5 steps
and the final (gathered) parameters agree to 1e-5 relative. One harness; architectures and layouts
register here as they land."""
from __future__ import annotations

import pytest
import torch

import toy_arch  # noqa: F401  (registers the test-only "toy" arch: it enters through the registry alone)
from compare import assert_state_close
from spawn_ranks import spawn_ranks

STEPS, GLOBAL, MICRO, SEQ, VOCAB, SEED = 5, 8, 2, 16, 128, 0
EPS = 1e-4  # Adam's g/(sqrt(v)+eps) turns reduction-order noise on near-zero gradients into O(1) update
# differences at eps 1e-8; 1e-4 keeps layouts ~20x inside the tolerance while training still moves every weight

# name -> (registered arch, config overrides of its `tiny` preset)
ARCHS = {
    "transformer": ("transformer", dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)),
    "transformer-tied": ("transformer", dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True)),
    # chunk 16 over 16 tokens per sample: cp2 / cp4 cut it into halves / quarters
    "deltanet": ("deltanet", dict(d_model=64, n_layers=2, n_heads=4, chunk_size=16, decay_gate=True, output_gate=True)),
    "deltanet-swa": ("deltanet", dict(d_model=64, n_layers=2, n_heads=4, chunk_size=16, hybrid="swa", window=6)),
    "deltanet-global": ("deltanet", dict(d_model=64, n_layers=3, n_heads=4, chunk_size=16, hybrid="global",
                                         attn_layers=[2])),
    # 8 experts of width 16, top-2; SwitchHead with 4 experts per head; two shared layers applied twice
    "moeut": ("moeut", dict()),
    # residual 8×16, 4 heads of 16, z-loss on (its vocab-parallel logsumexp under TP), learned positions
    "rmt": ("rmt", dict(d_key=8, d_value=16, rank=4, n_layers=2, d_ff=64)),
    # d 32 = 8 tables of 4 bits (16 rows), 4 heads of 8 (2 rotary dims); ML2 8 tables of 6 bits; its own TP style
    "memoryformer": ("memoryformer", dict(d_model=32, n_layers=2, n_heads=4, code_bits=4)),
    # ops_tests/toy_arch.py: its own TP style and context-parallel core, no code in parallel/ or launcher/
    "toy": ("toy", dict()),
}
LAYOUTS = {
    "dp2-zero1": dict(dp=2, zero=1),
    "dp2-zero2": dict(dp=2, zero=2),
    "tp2": dict(tp=2, zero=1),
    "tp2-zero0": dict(tp=2, zero=0),
    "tp2+sp": dict(tp=2, sp=True, zero=1),
    "pp2": dict(pp=2, zero=1),
    "pp2-zero0": dict(pp=2, zero=0),
    "pp2-ckpt": dict(pp=2, zero=1, ckpt=True),
    "tp2xdp2": dict(tp=2, dp=2, zero=1),
    "tp2xpp2": dict(tp=2, pp=2, zero=1),
    "tp2+spxpp2": dict(tp=2, pp=2, sp=True, zero=1),
    "pp2xdp2": dict(pp=2, dp=2, zero=1),
    "cp2": dict(cp=2, zero=1),
    "cp4": dict(cp=4, zero=1),
    "cp2xdp2": dict(cp=2, dp=2, zero=1),
    "cp2-zero2": dict(cp=2, zero=2),
    "tp2xcp2": dict(tp=2, cp=2, zero=1),
    "pp2xcp2": dict(pp=2, cp=2, zero=1),
    "tp2+spxcp2": dict(tp=2, cp=2, sp=True, zero=1),
    "ep2": dict(dp=2, ep=2, zero=1),
    "ep2-zero0": dict(dp=2, ep=2, zero=0),
    "ep2-zero2": dict(dp=2, ep=2, zero=2),
    "ep2xdp2": dict(dp=4, ep=2, zero=1),
}
# Every layout for the main variant; the tied-embedding variant where tying changes the code path.
# context parallelism needs a model with a sequence-mixing core (DeltaNet)
CP_LAYOUTS = ("cp2", "cp4", "cp2xdp2", "cp2-zero2", "tp2xcp2", "pp2xcp2", "tp2+spxcp2")
# expert parallelism needs a model with an expert bank (MoEUT)
EP_LAYOUTS = ("ep2", "ep2-zero0", "ep2-zero2", "ep2xdp2")
CASES = [("transformer", name) for name in LAYOUTS if name not in CP_LAYOUTS + EP_LAYOUTS] + [
    ("transformer-tied", name) for name in ("tp2", "tp2+sp", "pp2", "tp2xpp2")
] + [("deltanet", name) for name in ("tp2", "tp2+sp", "pp2", *CP_LAYOUTS)] + [
    ("deltanet-swa", "tp2"), ("deltanet-global", "tp2"),
] + [("moeut", name) for name in ("tp2", "tp2xdp2", "pp2", "tp2xpp2", *EP_LAYOUTS)] + [
    ("rmt", name) for name in ("tp2", "tp2+sp", "pp2", "dp2-zero1", "dp2-zero2", "tp2xpp2")
] + [
    ("memoryformer", name) for name in ("tp2", "pp2", "dp2-zero1", "dp2-zero2", "tp2xpp2")
] + [
    ("toy", name) for name in ("tp2", "pp2", "dp2-zero1", "cp2")
]


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g) for _ in range(STEPS)]


def _world(layout: dict) -> int:
    return layout.get("tp", 1) * layout.get("dp", 1) * layout.get("pp", 1) * layout.get("cp", 1)


def _train(rank: int, world: int, variant: str, layout: dict) -> dict:
    import models
    from parallel.engine import EngineConfig, build_engine
    from parallel.parallelize import parallelize
    from parallel.context import context_slice
    from parallel.expert import gather_experts
    from parallel.pipeline import canonical_parameters
    from parallel.pipeline import is_pipeline
    from parallel.step import eval_loss, train_step
    from parallel.tensor import gather_full
    from parallel.topology import Topology, build_groups

    arch, overrides = ARCHS[variant]
    tp, dp, pp, zero = layout.get("tp", 1), layout.get("dp", 1), layout.get("pp", 1), layout.get("zero", 1)
    cp, ep = layout.get("cp", 1), layout.get("ep", 1)
    topo = Topology(tp=tp, dp=dp, pp=pp, cp=cp, ep=ep)
    assert topo.world == world
    groups = build_groups(topo, rank)
    cfg = models.make_config(arch, "tiny", vocab_size=VOCAB, max_seq_len=SEQ, **overrides)
    if world == 1:  # the reference: one process builds the whole model with real tensors
        model = models.build(cfg, seed=SEED)
    else:  # a layout: meta model, sharded, and only this rank's part materialised (layout-free init)
        with torch.device("meta"):
            model = models.build(cfg)
    module, loss_fn = parallelize(model, arch, groups, seed=SEED, sequence_parallel=layout.get("sp", False),
                                  activation_checkpointing=layout.get("ckpt", False))
    micro = MICRO if world > 1 else GLOBAL
    accum = GLOBAL // dp // micro
    engine = build_engine(module, EngineConfig(micro_batch=micro, grad_accum=accum, dp=dp, zero=zero, lr=1e-2, eps=EPS,
                                               warmup_steps=2, total_steps=STEPS, grad_clip=1.0,
                                               sequence_parallel=layout.get("sp", False)), groups)
    tp_group = groups["tp"] if tp > 1 else None
    ep_group = groups["ep"] if ep > 1 else None

    def params() -> dict[str, torch.Tensor]:
        return {n: gather_experts(p, ep_group) if getattr(p, "ep_shard_dim", None) is not None
                else gather_full(p, tp_group) for n, p in canonical_parameters(engine.module)}

    dp_rank, cp_rank = topo.coords(rank)["dp"], topo.coords(rank)["cp"]
    initial = params()
    losses = []
    for batch in _batches():
        mine = context_slice(batch.chunk(dp)[dp_rank], cp_rank, cp)
        losses.append(train_step(engine, list(mine.chunk(accum)), torch.device("cpu"), loss_fn).loss)
    held_out = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(4321))
    evaluator = engine if is_pipeline(engine.module) else engine.module
    val = eval_loss(evaluator, list(context_slice(held_out.chunk(dp)[dp_rank], cp_rank, cp).chunk(accum)),
                    torch.device("cpu"), loss_fn, dp_group=groups["dp_cp"])
    return {"losses": losses, "params": params(), "initial": initial, "val": val}


_single: dict[str, dict] = {}


def _reference(variant: str) -> dict:
    if variant not in _single:
        _single[variant] = spawn_ranks(_train, 1, variant, {})[0]
    return _single[variant]


@pytest.mark.parametrize("variant,name", CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_layout_matches_single_process(variant, name):
    layout = LAYOUTS[name]
    ref = _reference(variant)
    seen: set[str] = set()
    for r in spawn_ranks(_train, _world(layout), variant, layout):
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert r["val"] == pytest.approx(ref["val"], rel=1e-5)  # evaluation (the pipeline's own schedule under pp)
        mine = set(r["params"])
        assert mine <= set(ref["params"]), f"unexpected parameter names {sorted(mine - set(ref['params']))}"
        # every layout starts from the same weights, and ends where one process does
        assert_state_close({k: ref["initial"][k] for k in mine}, r["initial"], rel=0)
        assert_state_close({k: ref["params"][k] for k in mine}, r["params"], rel=1e-5)
        seen |= mine
    assert seen == set(ref["params"]), f"parameters held by no rank: {sorted(set(ref['params']) - seen)}"
    # the check has teeth: training moved the parameters far beyond the tolerance
    moved = max((ref["params"][k] - v).abs().max().item() for k, v in ref["initial"].items())
    assert moved > 1e-3
