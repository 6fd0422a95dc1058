"""MemoryFormer's math (specs/memoryformer.md §5) in float64: the closed-form weight against the brute-force
softmax over all 2^τ codes, the hash, the Memory Layer against its dense one-hot form and Eq. 12's gradients,
gradcheck, locality, bucket uniformity, the paper's sizes, and the block's wiring (shared codes, no W_O).
Causality, KV-cache decoding, meta builds and counts per preset come from test_models_contract.py (every
registered arch); the gather kernel's own tests are ops_tests/kernels/test_hashed_gather.py."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.layers.memory_layer import HashedMemory, bucket, code_probability, code_weight, hash_input
from models.memoryformer import (macs_per_token, memory_layers, num_params, paper_block_macs, table_bytes,
                                 table_params_per_layer)


def away_from_zero(*shape: int, seed: int, low: float = 0.1) -> torch.Tensor:
    """N(0, 1) values pushed to |x| ≥ low: a finite-difference step never flips a sign bit."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.sign() * (x.abs() + low)


def mf(**overrides) -> models.memoryformer.MemoryFormerConfig:
    base = dict(d_model=16, n_layers=2, n_heads=2, code_bits=4, vocab_size=31, max_seq_len=12)
    return models.make_config("memoryformer", "tiny", **{**base, **overrides})


# --- 1. closed form = brute force ------------------------------------------------------------------

@pytest.mark.parametrize("tau", [4, 8, 10])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_closed_form_weight_equals_the_softmax_over_all_codes(tau: int, temperature: float):
    z = torch.randn(5, tau, generator=torch.Generator().manual_seed(tau), dtype=torch.float64)
    codes = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=tau)), dtype=torch.float64)  # [2^τ, τ]
    softmax = torch.softmax(z @ codes.T / temperature, dim=-1)  # over every code s ∈ {±1}^τ
    at_sign = (codes[None] == z.sign()[:, None]).all(-1)  # the code s = sign(z)
    brute = softmax[at_sign]
    torch.testing.assert_close(code_probability(z, temperature), brute, rtol=1e-12, atol=0)
    torch.testing.assert_close(code_weight(z, temperature, "paper"), brute, rtol=1e-12, atol=0)
    torch.testing.assert_close(code_weight(z, temperature, "official"), z.abs().sum(-1) * brute, rtol=1e-12, atol=0)


def test_official_score_keeps_a_table_contribution_order_one():
    z = torch.randn(200_000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(code_weight(z, 1.0, "paper").mean().item() - 0.134) < 0.005  # spec §1 (derived)
    assert abs(code_weight(z, 1.0, "official").mean().item() - 0.97) < 0.02


# --- 2. the hash --------------------------------------------------------------------------------------

def test_hash_range_bit_flips_and_order():
    tau = 6
    z = away_from_zero(1000, tau, seed=1)
    b = bucket(z)
    assert b.min() >= 0 and b.max() < 2 ** tau
    assert bucket(torch.zeros(tau)) == 2 ** tau - 1  # all non-negative: every bit set
    assert bucket(torch.tensor([1.0] + [-1.0] * (tau - 1))) == 2 ** (tau - 1)  # coordinate 0 is the top bit
    for i in range(tau):
        flipped = z.clone()
        flipped[:, i] = -flipped[:, i]
        diff = b ^ bucket(flipped)
        assert (diff == 2 ** (tau - 1 - i)).all()  # exactly one bit, the coordinate's own


def test_hash_input_offsets_each_chunk_into_its_own_table():
    x = away_from_zero(3, 5, 12, seed=2)  # leading dims [3, 5], K = 3 chunks of τ = 4
    codes = hash_input(x, 4)
    assert codes.index.shape == codes.weight.shape == (3, 5, 3)
    for k in range(3):
        assert torch.equal(codes.index[..., k], bucket(x[..., 4 * k:4 * (k + 1)]) + k * 16)
    with pytest.raises(ValueError, match="not divisible by code_bits=5"):
        hash_input(x, 5)


# --- 3. the Memory Layer = its dense one-hot form; Eq. 12's gradients ------------------------------

def layer(d_in: int = 12, d_out: int = 7, tau: int = 4, score_fn: str = "official", temperature: float = 1.0,
          backend: str = "index") -> HashedMemory:
    m = HashedMemory(d_in, d_out, tau, temperature=temperature, score_fn=score_fn, projection=False, bias=True,
                     backend=backend).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        m.memory.tables.copy_(torch.randn(m.memory.tables.shape, generator=g, dtype=torch.float64))
        m.memory.bias.copy_(torch.randn(d_out, generator=g, dtype=torch.float64))
    return m


def dense_one_hot(m: HashedMemory, x: torch.Tensor, temperature: float, score_fn: str) -> torch.Tensor:
    """y = Σ_k w_k · onehot(h(z_k))ᵀ T_k + b, every table read by a one-hot matmul."""
    tau, K = m.memory.code_bits, m.memory.n_tables
    tables = m.memory.tables.view(K, 2 ** tau, -1)
    y = m.memory.bias.expand(*x.shape[:-1], -1)
    for k in range(K):
        z = x[..., k * tau:(k + 1) * tau]
        onehot = F.one_hot(bucket(z), 2 ** tau).to(x.dtype)
        y = y + code_weight(z, temperature, score_fn)[..., None] * (onehot @ tables[k])
    return y


@pytest.mark.parametrize("score_fn", ["official", "paper"])
@pytest.mark.parametrize("backend", ["index", "embedding_bag"])
def test_memory_layer_equals_dense_one_hot_forward_and_backward(score_fn: str, backend: str):
    m = layer(score_fn=score_fn, temperature=0.7, backend=backend)
    x = away_from_zero(2, 9, 12, seed=4).requires_grad_()
    dy = torch.randn(2, 9, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = m(x)
    grads = torch.autograd.grad(y, (x, m.memory.tables, m.memory.bias), dy)
    ref = dense_one_hot(m, x, 0.7, score_fn)
    ref_grads = torch.autograd.grad(ref, (x, m.memory.tables, m.memory.bias), dy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_gradients_are_eq12():
    """∂T_k[i] = p_k·∂y at i = h(z_k) and zero elsewhere; ∂z_{k,i} = ⟨∂y, T_k[h]⟩ · p·(2/t)·sign(z_i)·(1 − σ(2|z_i|/t))
    (the paper's weight p; no straight-through gradient from the hash)."""
    t, tau, K = 0.8, 4, 3
    m = layer(score_fn="paper", temperature=t)
    x = away_from_zero(6, 12, seed=6).requires_grad_()
    dy = torch.randn(6, 7, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dx, dT = torch.autograd.grad(m(x), (x, m.memory.tables), dy)
    codes = hash_input(x.detach(), tau, t, "paper")
    expect_T = torch.zeros_like(m.memory.tables)
    expect_x = torch.zeros_like(x)
    for n, k in itertools.product(range(6), range(K)):
        row, p = codes.index[n, k], codes.weight[n, k]
        expect_T[row] += p * dy[n]
        z = x.detach()[n, k * tau:(k + 1) * tau]
        dp = p * (2 / t) * z.sign() * (1 - torch.sigmoid(2 * z.abs() / t))
        expect_x[n, k * tau:(k + 1) * tau] = (dy[n] @ m.memory.tables[row].detach()) * dp
    torch.testing.assert_close(dT, expect_T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, expect_x, rtol=1e-12, atol=1e-12)
    selected = torch.zeros(m.memory.tables.shape[0], dtype=torch.bool)
    selected[codes.index.flatten()] = True
    assert (dT[~selected] == 0).all() and (dT[selected].abs().sum(-1) > 0).all()


# --- 4. gradcheck -------------------------------------------------------------------------------------

@pytest.mark.parametrize("score_fn", ["official", "paper"])
def test_gradcheck_tables_bias_and_x(score_fn: str):
    m = layer(d_in=8, d_out=3, score_fn=score_fn)
    x = away_from_zero(4, 8, seed=8, low=0.2).requires_grad_()

    def f(x, tables, bias):  # noqa: ANN001, ANN202
        return torch.func.functional_call(m, {"memory.tables": tables, "memory.bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, m.memory.tables.detach().requires_grad_(),
                                        m.memory.bias.detach().requires_grad_()), eps=1e-6, atol=1e-7)


# --- 5. locality, 6. uniformity ----------------------------------------------------------------------

def test_inputs_with_one_sign_pattern_hit_the_same_rows_and_differ_only_through_the_weight():
    m = layer()
    x = away_from_zero(1, 12, seed=9)
    y = away_from_zero(1, 12, seed=10).abs() * x.sign()  # same signs, other magnitudes
    cx, cy = hash_input(x, 4), hash_input(y, 4)
    assert torch.equal(cx.index, cy.index) and not torch.allclose(cx.weight, cy.weight)
    rows = m.memory.tables[cx.index[0]]  # [K, h]
    for inp, c in ((x, cx), (y, cy)):
        torch.testing.assert_close(m(inp)[0], c.weight[0] @ rows + m.memory.bias, rtol=1e-12, atol=1e-12)


def _chi2_quantile(df: int, z: float) -> float:
    """Wilson–Hilferty: the χ²(df) quantile at standard-normal quantile z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_buckets_of_normalised_gaussian_inputs_are_uniform():
    """RMSNorm keeps signs: zero-mean Gaussian inputs fill the buckets uniformly (χ², p = 0.001), a shifted
    input does not (Fig. 4's uniformity relies on the zero-mean normalised input)."""
    tau, n = 8, 51_200  # 200 expected per bucket
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 3

    def chi2(inputs: torch.Tensor) -> float:
        counts = torch.bincount(bucket(F.rms_norm(inputs, (64,))[:, :tau]), minlength=2 ** tau).double()
        return ((counts - n / 2 ** tau) ** 2 / (n / 2 ** tau)).sum().item()

    critical = _chi2_quantile(2 ** tau - 1, 3.09)
    assert chi2(x) < critical, chi2(x)
    assert chi2(x + 1.5) > 10 * critical


# --- 7. the paper's sizes -----------------------------------------------------------------------------

def test_table_storage_and_block_macs_match_the_paper():
    tiny, small, base = (models.make_config("memoryformer", p) for p in ("mf-tiny", "mf-small", "mf-base"))
    fp16 = table_bytes(tiny)
    assert round(fp16["q"] / 1e6, 1) == 16.8  # Table 3, τ 8
    assert round((fp16["ml1"] + fp16["ml2"]) / 1e6, 1) == 88.1  # Table 5, 2 extra bits
    for cfg, per_layer, total, macs in ((tiny, 69.2, 0.42, 0.40), (small, 155.7, 1.87, 0.91), (base, 276.8, 6.64, 1.61)):
        tables = sum(table_params_per_layer(cfg).values())
        assert round(tables / 1e6, 1) == per_layer
        assert round(tables * cfg.n_layers / 1e9, 2) == total
        assert round(paper_block_macs(cfg, 2048) / 1e9, 2) == macs
    q = table_params_per_layer(tiny)
    assert (q["q"] + q["k"] + q["v"], q["ml1"], q["ml2"]) == (3 * 64 * 256 * 512, 64 * 256 * 640, 64 * 1024 * 512)


def test_extra_bit_and_extra_table_shapes():
    bit = models.make_config("memoryformer", "mf-tiny")
    assert memory_layers(bit)["ml1"] == (64, 8, 640) and memory_layers(bit)["ml2"] == (64, 10, 512)
    table = models.make_config("memoryformer", "mf-tiny", ffn_expand_mode="extra_table")
    assert memory_layers(table)["ml1"] == (64, 8, 1024) and memory_layers(table)["ml2"] == (128, 8, 512)
    for kind in ("extra_bit", "extra_table"):
        cfg = mf(ffn_expand_mode=kind)
        with torch.device("meta"):
            model = models.build(cfg)
        ffn = model.layers[0].ffn
        K2, tau2, _ = memory_layers(cfg)["ml2"]
        assert ffn.ml1.memory.tables.shape == (4 * 16, cfg.ffn_width)
        assert ffn.ml2.memory.tables.shape == (K2 * 2 ** tau2, 16) and ffn.ml2.code_bits == tau2


def test_macs_per_token_counts_every_gathered_row():
    cfg = mf()
    K, d, w = 4, 16, cfg.ffn_width  # w = 4·(4 + 2) = 24
    per_layer = 3 * K * d + K * w + (w // 6) * d + 2 * 10 * d
    assert macs_per_token(cfg, 10) == 2 * per_layer + d * 31


@pytest.mark.parametrize("overrides", [dict(hash_projection="dense"), dict(hash_projection="dense", share_qkv_hash=False),
                                       dict(attn_out_proj=True), dict(ffn_mid_norm="rmsnorm"), dict(ffn_mid_norm="none"),
                                       dict(use_bias=False), dict(ffn_expand_mode="extra_table")])
def test_num_params_counts_every_option(overrides: dict):
    cfg = mf(**overrides)
    with torch.device("meta"):
        model = models.build(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


# --- 8. the block -------------------------------------------------------------------------------------

def test_q_k_v_share_one_hash_and_there_is_no_output_projection():
    model = models.build(mf(), seed=0).double()
    attn = model.layers[0].attn
    seen = []
    for m in (attn.q.memory, attn.k.memory, attn.v.memory):
        m.register_forward_pre_hook(lambda mod, args: seen.append(args))
    calls = []
    real = attn.q.codes
    attn.q.codes = lambda x: calls.append(1) or real(x)
    x = away_from_zero(2, 5, 16, seed=12)
    a = attn(x)
    assert len(calls) == 1 and len(seen) == 3
    assert all(s[0] is seen[0][0] and s[1] is seen[0][1] for s in seen)  # the same index and weight tensors
    assert attn.out is None and not any("out" in n for n, _ in attn.named_parameters())
    q, k, v = (t.transpose(1, 2) for t in attn.qkv(x))  # a = the concatenated heads, nothing after them
    torch.testing.assert_close(a, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))


def test_rope_rotates_a_quarter_of_each_head():
    cfg = mf(d_model=32, n_heads=2, code_bits=4)  # head_dim 16: 4 rotary dims
    attn = models.build(cfg, seed=0).double().layers[0].attn
    x = away_from_zero(1, 6, 32, seed=13)
    q, k, v = attn.qkv(x)
    raw_q = attn.q(x).unflatten(-1, (-1, 16))
    assert attn.rotary_dim == 4
    torch.testing.assert_close(q[..., 4:], raw_q[..., 4:], rtol=0, atol=0)  # the other 12 untouched
    assert not torch.allclose(q[:, 1:, :, :4], raw_q[:, 1:, :, :4])  # rotated from position 1 on
    torch.testing.assert_close(q[:, 0], raw_q[:, 0])  # position 0: rotation by 0


def test_block_wiring_is_the_code_memory_block_reads_norm_z():
    cfg = mf()
    blk = models.build(cfg, seed=0).double().layers[0]
    x = away_from_zero(2, 5, 16, seed=14)
    z = x + blk.attn(blk.attn_norm(x))
    h = blk.ffn.ml1(blk.ffn_norm(z))
    expect = z + blk.ffn.ml2(blk.ffn.mid_norm(h))  # no activation, LayerNorm between
    assert isinstance(blk.ffn.mid_norm, models.layers.norm.LayerNorm) and not blk.ffn.gelu
    torch.testing.assert_close(blk(x), expect, rtol=0, atol=0)


def test_init_is_the_code_s():
    cfg = models.make_config("memoryformer", "tiny", d_model=128, n_heads=4)
    model = models.build(cfg, seed=0)
    attn, ffn = model.layers[0].attn, model.layers[0].ffn
    assert abs(attn.q.memory.tables.std().item() - math.sqrt(2 / (5 * 128))) < 0.002
    assert abs(ffn.ml2.memory.tables.std().item() - 0.02) < 0.001
    assert abs(ffn.ml1.memory.bias.std().item() - 0.001) < 0.0003


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (dict(d_model=20, code_bits=8), ["d_model=20", "code_bits=8", "20 % 8 = 4"]),
    (dict(num_tables=3), ["num_tables=3", "code_bits=4", "= 12", "d_model=16"]),
    (dict(code_bits=21, d_model=42, n_heads=2), ["code_bits=21", "2^code_bits rows", "1..20"]),
    (dict(ffn_expand_bits=17), ["ffn_expand_bits=17", "2^21", "<= 20"]),
    (dict(score_fn="softmax"), ["score_fn='softmax'", "official, paper"]),
    (dict(ffn_expand_mode="wide"), ["ffn_expand_mode='wide'", "extra_bit, extra_table"]),
    (dict(gather_backend="cuda"), ["gather_backend='cuda'", "auto, index, embedding_bag, triton"]),
])
def test_bad_fields_name_the_key_the_arithmetic_and_the_allowed_values(overrides: dict, words: list[str]):
    with pytest.raises(ValueError) as e:
        mf(**overrides)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_shared_codes_sort_once_for_q_k_v_and_give_the_gradients_of_separate_hashes(monkeypatch: pytest.MonkeyPatch):
    """One hash (and one sort of its rows for the table gradients) serves Q, K and V: the same math as three
    hashes of the same input (equal up to summation order: ∂w of the three layers meets before the hash)."""
    import models.layers.memory_layer as ml

    sorts = []
    real = ml.make_gather_plan
    monkeypatch.setattr(ml, "make_gather_plan", lambda idx, rows: sorts.append(rows) or real(idx, rows))
    tokens = torch.randint(0, 31, (2, 12), generator=torch.Generator().manual_seed(15))
    grads = {}
    for shared in (True, False):
        model = models.build(mf(share_qkv_hash=shared), seed=0)
        loss = model(tokens).logsumexp(-1).mean()
        loss.backward()
        grads[shared] = {n: p.grad for n, p in model.named_parameters()}
    assert sorts == [4 * 16, 4 * 16]  # one sort of the shared codes per block (2 blocks), none when unshared
    assert grads[True].keys() == grads[False].keys()
    for n, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][n], rtol=1e-5, atol=1e-8, msg=n)
