"""The architecture contract (models/README.md), checked for every registered architecture and preset
without a per-arch line: an architecture that registers gets these tests for free.

Per arch (its `tiny` preset at a small vocabulary): causality, same seed -> same weights (and another
seed -> others), the meta build + init equals the direct build, forward/backward twice bitwise
identical, and — where the model declares generation (`new_cache` + `step`) — incremental decoding
equals the parallel forward. Per preset: the meta model's parameter count equals `num_params`.
Sharded builds and plan counts are checked on gloo ranks in ops_tests/parallel/test_contract_sharding.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
import toy_arch  # noqa: F401  (registers the test-only "toy" architecture: it gets these tests too)

VOCAB, SEQ = 96, 24
ARCHS = models.names()
PRESETS = [(a, p) for a in ARCHS for p in models.get_spec(a).presets if models.get_spec(a).num_params is not None]


def tiny(arch: str, **overrides):  # noqa: ANN201 - the arch's config
    return models.make_config(arch, "tiny", vocab_size=VOCAB, max_seq_len=SEQ, **overrides)


def _logits(out):  # noqa: ANN001, ANN202
    return out[0] if isinstance(out, tuple) else out


def _visible(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights initialised to zero (RMT's unembedding) drawn at random instead: a zero head would make
    every logit 0 and these tests vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


def _tokens(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,preset", PRESETS, ids=[f"{a}-{p}" for a, p in PRESETS])
def test_meta_parameter_count_is_num_params(arch, preset):
    spec = models.get_spec(arch)
    cfg = models.make_config(arch, preset)
    with torch.device("meta"):
        model = models.build(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == spec.num_params(cfg)  # tied weights once


@pytest.mark.parametrize("arch", ARCHS)
def test_future_tokens_never_change_past_logits(arch):
    model = _visible(models.build(tiny(arch), seed=1)).double().eval()
    tokens = _tokens()
    with torch.no_grad():
        base = _logits(model(tokens))
        for t in (0, 7, SEQ - 2):
            changed = tokens.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
            out = _logits(model(changed))
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-12)
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-6  # the change is seen where it happens


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_a_function_of_the_seed(arch):
    cfg = tiny(arch)
    a, b, c = (dict(models.build(cfg, seed=s).named_parameters()) for s in (3, 3, 4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every parameter drawn at random differs under another seed (norm gains and biases are constants)
    random = [k for k in a if a[k].numel() > 1 and a[k].std() > 0]
    assert random and all(not torch.equal(a[k], c[k]) for k in random)
    torch.manual_seed(11)
    d = dict(models.build(cfg).named_parameters())
    torch.manual_seed(11)
    e = dict(models.build(cfg).named_parameters())
    assert all(torch.equal(d[k], e[k]) for k in d)  # torch.manual_seed still picks the weights


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_build_then_init_equals_direct_build(arch):
    from parallel.materialize import materialize

    cfg = tiny(arch)
    direct = models.build(cfg, seed=5)
    with torch.device("meta"):
        meta = models.build(cfg)
    materialize(meta, [meta], meta.init_rules(), 5)  # the per-rank path, with nothing cut
    for (n, p), (m, q) in zip(direct.named_parameters(), meta.named_parameters()):
        assert n == m and torch.equal(p, q), n
    for (n, b), (_, c) in zip(direct.named_buffers(), meta.named_buffers()):
        assert torch.equal(b, c), n  # derived buffers (rope tables) recomputed, not left as to_empty garbage
    with torch.no_grad():
        tokens = _tokens()
        assert torch.equal(_logits(direct.eval()(tokens)), _logits(meta.eval()(tokens)))


def _loss_and_grads(model: torch.nn.Module, arch: str, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    spec = models.get_spec(arch)
    model.zero_grad(set_to_none=True)
    out = model(tokens[:, :-1])
    loss = F.cross_entropy(_logits(out).flatten(0, 1).float(), tokens[:, 1:].flatten())
    if isinstance(out, tuple):
        loss = loss + spec.aux_loss(model.cfg, out[1])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_twice_bitwise_identical(arch):
    model = _visible(models.build(tiny(arch), seed=2)).train()
    tokens = _tokens(seed=9)
    loss1, grads1 = _loss_and_grads(model, arch, tokens)
    loss2, grads2 = _loss_and_grads(model, arch, tokens)
    assert torch.equal(loss1, loss2)
    assert grads1.keys() == grads2.keys() and grads1
    for k in grads1:
        assert torch.equal(grads1[k], grads2[k]), k


GENERATING = [a for a in ARCHS if hasattr(models.get_spec(a).model_cls, "step")
              and hasattr(models.get_spec(a).model_cls, "new_cache")]


@pytest.mark.parametrize("arch", GENERATING)
def test_incremental_generation_equals_parallel_forward(arch):
    model = _visible(models.build(tiny(arch), seed=3)).double().eval()
    tokens = _tokens()
    with torch.no_grad():
        parallel = _logits(model(tokens))
        cache = model.new_cache()
        stepped = torch.stack([model.step(tokens[:, t], cache) for t in range(SEQ)], dim=1)
    torch.testing.assert_close(stepped, parallel, rtol=1e-10, atol=1e-10)


def test_the_contract_covers_every_built_architecture():
    # the built archs and the test-only toy are all in the parametrisations above
    assert {"transformer", "deltanet", "moeut", "rmt", "memoryformer", "toy"} <= set(ARCHS)
    assert {"transformer", "deltanet", "rmt", "memoryformer"} <= set(GENERATING)
