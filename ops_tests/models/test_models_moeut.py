"""MoEUT: presets against the spec's parameter and MAC tables, σ-MoE and SwitchHead against dense
all-experts formulations in float64, the entropy regulariser against a log-space hand computation,
shared layers' summed gradients, determinism, and a loss that falls."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.layers.sigma_moe import SigmaMoE
from models.layers.switch_head import SwitchHeadAttention, renorm_rows
from models.moeut import entropy_regularizer, expert_load_metrics, macs_per_token, num_params

# spec §1.6: (params in M, MoEUT MACs/token in M), rounded to 0.1M as the spec prints them
SPEC_TABLE = {"44m": (44.3, 34.7), "126m": (125.7, 78.9), "244m": (243.3, 140.7), "318m": (318.1, 186.4),
              "727m": (727.4, 440.4), "1b": (1040.3, 633.7)}


@pytest.mark.parametrize("preset", list(SPEC_TABLE))
def test_preset_params_and_macs_match_spec(preset):
    cfg = models.make_config("moeut", preset)
    with torch.device("meta"):
        model = models.build(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == num_params(cfg)
    params, macs = SPEC_TABLE[preset]
    assert round(counted / 1e6, 1) == params
    assert round(macs_per_token(cfg) / 1e6, 1) == macs


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1 for the k largest of the last dim (by a full descending sort: independent of topk)."""
    ranks = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return (ranks < k).to(scores.dtype)


def test_sigma_moe_equals_dense_all_experts_float64():
    torch.manual_seed(0)
    B, T, d, E, es, k = 2, 5, 8, 6, 4, 3
    moe = SigmaMoE(d, E, es, k).double()
    moe.init_weights(1.0)
    x, sel = torch.randn(B, T, d, dtype=torch.float64), torch.randn(B, T, d, dtype=torch.float64)
    y, probs = moe(x, sel)
    s = sel @ moe.router.t()
    g = torch.sigmoid(s) * _top_mask(s, k)  # no renormalisation
    h = torch.relu(torch.einsum("btd,eds->btes", x, moe.experts.keys))
    ref = torch.einsum("bte,btes,esd->btd", g, h, moe.experts.values)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs, torch.softmax(s, -1).mean(1), rtol=1e-12, atol=1e-12)


def _dense_switchhead(att: SwitchHeadAttention, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    B, T, d = x.shape
    dh, NA = att.head_dim, att.n_experts
    H = att.w_o.shape[0] // NA
    q = att._rotate(att.wq(a).view(B, T, H, dh)) * dh ** -0.25
    k = att._rotate(att.wk(a).view(B, T, H, dh)) * dh ** -0.25
    wv, wo = att.w_v.view(H, NA, d, dh), att.w_o.view(H, NA, dh, d)
    if NA == 1:
        v = torch.einsum("btd,hde->bthe", x, wv[:, 0])
    else:
        sv = (a @ att.router_v.t()).view(B, T, H, NA)
        gv = torch.sigmoid(sv) * _top_mask(sv, 2)
        v = torch.einsum("bthn,btd,hnde->bthe", gv, x, wv)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    A = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)
    so = (a @ att.router_o.t()).view(B, T, H, NA)
    go = torch.sigmoid(so) * (_top_mask(so, 2) if NA > 1 else 1)
    return torch.einsum("bthn,bthe,hned->btd", go, A, wo)


@pytest.mark.parametrize("n_experts", [4, 1])
def test_switchhead_equals_dense_all_experts_float64(n_experts):
    """NA = 4: top-2 mixtures of V and O per head; NA = 1: dense V/O, each head gated by σ(a sel_oᵀ)."""
    torch.manual_seed(1)
    B, T, d, H, dh = 2, 7, 12, 3, 10  # dh 10: RoPE on the first 4 channels (half, rounded down to even)
    att = SwitchHeadAttention(d, H, dh, n_experts, 2, 32, 10000.0).double()
    att.init_weights(1.0)
    a, x = torch.randn(B, T, d, dtype=torch.float64), torch.randn(B, T, d, dtype=torch.float64)
    out, stats = att(a, x)
    torch.testing.assert_close(out, _dense_switchhead(att, a, x), rtol=1e-12, atol=1e-12)
    assert len(stats) == (2 if n_experts > 1 else 0)
    assert att.n_rotate == 4
    q = torch.randn(1, T, H, dh, dtype=torch.float64)
    torch.testing.assert_close(att._rotate(q)[..., 4:], q[..., 4:])  # the second half is not rotated
    assert not torch.allclose(att._rotate(q)[:, 1:, :, :4], q[:, 1:, :, :4])


def test_renorm_rows_is_the_spec_formula():
    """spec §1.5: row_i ← (row_i/‖row_i‖)·std(row_i)/s, s = std of the row-normalised matrix."""
    w = torch.randn(6, 10, dtype=torch.float64) * torch.linspace(0.5, 3.0, 6, dtype=torch.float64)[:, None]
    unit = w / w.norm(dim=-1, keepdim=True)
    expected = unit * w.std(dim=-1, keepdim=True) / unit.std()
    renorm_rows(w)
    torch.testing.assert_close(w, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("n_experts", [1, 4])
def test_switchhead_routers_keep_each_rows_own_scale(n_experts):
    """sel_v and sel_o get renorm_rows for every NA, NA = 1 included (spec §1.5): each row keeps its own std,
    so row norms (= std(row_i)/s) differ from row to row like the std of d normals, ~1/√(2d) ≈ 9% at d = 64.
    σ-MoE's renorm_keep_std instead makes every norm equal (to rounding)."""
    torch.manual_seed(4)
    d, H, dh, scale = 64, 8, 16, 0.5
    att = SwitchHeadAttention(d, H, dh, n_experts, 2, 32, 10000.0).double()
    att.init_weights(scale)
    routers = [att.router_o] + ([att.router_v] if n_experts > 1 else [])
    assert len(routers) == (2 if n_experts > 1 else 1)
    for r in routers:
        norms = r.norm(dim=-1)
        assert (norms.std() / norms.mean()).item() > 0.02, "router rows all have the same norm"
        # std(row_i) ≈ scale/√d and s ≈ 1/√d, so ‖row_i‖ ≈ scale on average.
        assert abs(norms.mean().item() / scale - 1) < 0.1


def _tiny(**kw) -> models.moeut.MoEUTConfig:
    return models.make_config("moeut", "tiny", vocab_size=64, **kw)


def test_regularizer_equals_log_space_hand_computation():
    torch.manual_seed(2)
    cfg = _tiny(att_n_experts=3)
    model = models.build(cfg).double()
    logits = {}  # (kind, layer) -> list of router logits over applications

    def hook(kind, i):  # noqa: ANN001, ANN202
        def fn(module, args):  # noqa: ANN001, ANN202
            if kind == "ffn":
                logits.setdefault((kind, i), []).append(args[1] @ module.router.t())
            else:
                for name, r in (("v", module.router_v), ("o", module.router_o)):
                    s = args[0] @ r.t()
                    logits.setdefault((name, i), []).append(s.view(*s.shape[:2], -1, cfg.att_n_experts))
        return fn

    for i, layer in enumerate(model.layers):
        layer.ffn.register_forward_pre_hook(hook("ffn", i))
        layer.attn.register_forward_pre_hook(hook("att", i))
    _, aux = model(torch.randint(0, 64, (3, 9)))

    def neg_entropy(s: torch.Tensor) -> torch.Tensor:
        """s [R, T, (H,) E] of one sequence: log p̄ = logsumexp over (r, t) of log_softmax − log(R·T)."""
        log_mean = torch.logsumexp(torch.log_softmax(s, -1).flatten(0, 1), 0) - math.log(s.shape[0] * s.shape[1])
        return (log_mean.exp() * log_mean).sum(-1).mean()  # mean over heads for SwitchHead

    hand = 0.0
    for (kind, i), ss in logits.items():
        s = torch.stack(ss)  # [R, B, T, ...]
        per_b = torch.stack([neg_entropy(s[:, b]) for b in range(s.shape[1])]).mean()
        hand = hand + (cfg.entropy_reg if kind == "ffn" else cfg.att_entropy_reg) * per_b
    assert len(logits) == 3 * cfg.group_size and all(len(v) == cfg.repeats for v in logits.values())
    torch.testing.assert_close(entropy_regularizer(cfg, aux), hand, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("order", ["abab", "aabb"])
def test_shared_layers_receive_summed_gradients(order):
    """The shared model's gradients equal the sums over an unrolled copy with one layer per depth."""
    torch.manual_seed(3)
    cfg = _tiny(group_order=order)
    model = models.build(cfg).double()
    tokens = torch.randint(0, 64, (2, 8))
    logits, aux = model(tokens)
    (logits.square().mean() + entropy_regularizer(cfg, aux)).backward()

    unrolled = [copy.deepcopy(model.layers[i]) for i in cfg.schedule()]
    for u in unrolled:
        u.zero_grad()
    h, aux2 = model.tok_embeddings(tokens), 0
    for u in unrolled:
        h, a = u(h)
        aux2 = aux2 + a
    out = model.output(model.norm(h))
    torch.testing.assert_close(out, logits, rtol=0, atol=0)
    (out.square().mean() + entropy_regularizer(cfg, aux2)).backward()
    for i, layer in enumerate(model.layers):
        copies = [u for u, j in zip(unrolled, cfg.schedule()) if j == i]
        for name, p in layer.named_parameters():
            summed = sum(dict(c.named_parameters())[name].grad for c in copies)
            torch.testing.assert_close(p.grad, summed, rtol=1e-10, atol=1e-14, msg=name)
    assert cfg.schedule() == ([0, 1, 0, 1] if order == "abab" else [0, 0, 1, 1])


def test_model_forward_backward_twice_bitwise_identical():
    cfg = _tiny()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = models.build(cfg)
        logits, aux = model(tokens)
        (F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + entropy_regularizer(cfg, aux)).backward()
        runs.append([logits.detach()] + [p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_tiny_learns_a_batch():
    torch.manual_seed(6)
    cfg = _tiny()
    model = models.build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (2, 9))
    losses = []
    for _ in range(20):
        logits, aux = model(tokens[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        (ce + entropy_regularizer(cfg, aux)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(ce.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    assert isinstance(model(tokens), torch.Tensor)  # no regulariser outside training


@pytest.mark.parametrize("overrides,fragment", [
    (dict(n_layers=5), "multiple of group_size=2"),
    (dict(group_order="abba"), "allowed: abab, aabb"),
    (dict(moe_backend="cuda"), "allowed: auto, torch, triton"),
    (dict(top_k=9), "exceeds n_experts=8"),
])
def test_bad_config_names_the_field(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        _tiny(**overrides)


def test_expert_load_metrics_count_every_assignment_then_reset():
    torch.manual_seed(7)
    cfg = _tiny()
    model = models.build(cfg)
    B, T = 3, 10
    model(torch.randint(0, 64, (B, T)))
    loads = [layer.ffn.load.clone() for layer in model.layers]
    assert all(int(c.sum()) == B * T * cfg.top_k * cfg.repeats for c in loads)  # every application counted
    seen = []
    metrics = expert_load_metrics(model, lambda t: seen.append(t) or 2 * t)  # the sum over ranks is applied
    assert len(seen) == cfg.group_size and all(layer.ffn.load is None for layer in model.layers)
    for i, counts in enumerate(loads):
        share = counts.double() / counts.sum()
        assert metrics[f"moe/layer{i}/load_min"] == pytest.approx(share.min().item() * cfg.n_experts)
        assert metrics[f"moe/layer{i}/load_max"] == pytest.approx(share.max().item() * cfg.n_experts)
        h = -(share[share > 0] * share[share > 0].log()).sum().item() / math.log(cfg.n_experts)
        assert metrics[f"moe/layer{i}/load_entropy"] == pytest.approx(h)
    model.eval()
    model(torch.randint(0, 64, (B, T)))
    assert expert_load_metrics(model, lambda t: t) == {}  # evaluation is not counted
