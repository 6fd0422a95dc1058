"""RMT's math (specs/rmt.md §8) in float64: the Kronecker equivalence with an ordinary transformer of width
Dk·Dv, reads/writes against loops, counts, accounting, init moments, gradcheck. Causality, KV-cache
decoding, meta builds and counts per preset come from test_models_contract.py (every registered arch)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models
from models.layers.residual_matrix import MatrixNorm, read, write
from models.rmt import alibi_bias, alibi_slopes, flops_per_token, num_params, paper_num_params

V, T = 29, 7


def small(**overrides) -> models.rmt.RMTConfig:  # Dk = R: square keys, so a key used the wrong way round
    base = dict(d_key=3, d_value=4, rank=3, n_layers=2, d_ff=10, vocab_size=V, max_seq_len=T)  # is wrong, not a crash
    return models.make_config("rmt", "tiny", **{**base, **overrides})


def live(cfg, seed: int = 0) -> torch.nn.Module:
    """A float64 RMT whose every parameter is random (no zero unembedding or unit gains hiding a mistake)."""
    model = models.build(cfg, seed=seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if p.dim() > 1 else 0.2) + (p.dim() == 1))
    return model


# --- the Kronecker equivalence (§8.1) --------------------------------------------------------------

def kron_read(keys: torch.Tensor, dv: int) -> torch.Tensor:
    """Retrieval keys [R, Dk] (row h = r_h) -> the stacked map [R·Dv, Dk·Dv]: rows r_hᵀ ⊗ I_Dv."""
    return torch.kron(keys, torch.eye(dv, dtype=keys.dtype))


def kron_write(keys: torch.Tensor, dv: int) -> torch.Tensor:
    """Storage keys [Dk, R] (column h = w_h) -> [Dk·Dv, R·Dv]: columns w_h ⊗ I_Dv."""
    return torch.kron(keys, torch.eye(dv, dtype=keys.dtype))


def flat_norm(x: torch.Tensor, gain: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    if kind == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain
    mu = x.mean(-1, keepdim=True)
    return (x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + eps) * gain


def wide_transformer(P: dict[str, torch.Tensor], cfg, tokens: torch.Tensor) -> torch.Tensor:
    """An ordinary pre-norm transformer of width Dk·Dv (heads of Dv, explicit softmax), every matrix built
    from the RMT's parameters `P` by Kronecker products: the RMT must equal it exactly."""
    dv, R = cfg.d_value, cfg.rank
    B, N = tokens.shape
    x = F.embedding(tokens, P["tok_embeddings.table.weight"]) @ kron_write(P["tok_embeddings.write.weight"], dv).T
    if cfg.pos_encoding == "learned":
        x = x + P["tok_embeddings.positions.weight"][:N] @ kron_write(P["tok_embeddings.write_positions.weight"], dv).T
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    bias = alibi_bias(alibi_slopes(R), torch.arange(N), torch.arange(N)) if cfg.pos_encoding == "alibi" else 0.0
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = flat_norm(x, P[p + "attn_norm.weight"], cfg.norm, cfg.norm_eps)
        q, k, v = (h @ kron_read(P[p + f"attn.read_{n}.weight"], dv).T for n in "qkv")
        q, k, v = (t.view(B, N, R, dv).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(dv) / ((i + 1) if cfg.inverse_layer_attn_scaling else 1)
        logits = (q @ k.transpose(-1, -2)) * scale + bias
        att = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + att.transpose(1, 2).reshape(B, N, R * dv) @ kron_write(P[p + "attn.write.weight"], dv).T
        h = flat_norm(x, P[p + "ffn_norm.weight"], cfg.norm, cfg.norm_eps)
        f = F.gelu((h @ kron_read(P[p + "ffn.read.weight"], dv).T) @ P[p + "ffn.w1.weight"].T, approximate="tanh")
        x = x + (f @ P[p + "ffn.w2.weight"].T) @ kron_write(P[p + "ffn.write.weight"], dv).T
    h = flat_norm(x, P["norm.weight"], cfg.norm, cfg.norm_eps)
    return (h @ kron_read(P["output.read.weight"], dv).T) @ P["output.proj.weight"].T


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()) + logits.pow(2).mean()


VARIANTS = {"learned-rmsnorm": {}, "alibi-layernorm": dict(pos_encoding="alibi", norm="layernorm"),
            "wide-keys": dict(d_key=5, rank=2, d_value=3, inverse_layer_attn_scaling=False)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_rmt_equals_a_transformer_of_width_dk_dv_built_by_kronecker_products(variant):
    cfg = small(**VARIANTS[variant])
    model = live(cfg)
    tokens = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    logits = model(tokens)
    _loss(logits, tokens).backward()
    P = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref = wide_transformer(P, cfg, tokens)
    _loss(ref, tokens).backward()
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, P[name].grad, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_the_kronecker_reference_tells_a_storage_key_from_a_retrieval_key():
    """Negative control: the same reference with one write key used as a read (transposed) disagrees."""
    cfg = small()
    model = live(cfg)
    tokens = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    P = {n: p.detach().clone() for n, p in model.named_parameters()}
    P["layers.0.attn.write.weight"] = P["layers.0.attn.write.weight"].T.contiguous()
    with torch.no_grad():
        assert (model(tokens) - wide_transformer(P, cfg, tokens)).abs().max() > 1e-3


# --- reads, writes, shapes (§8.2–3) -------------------------------------------------------------------

def test_read_and_write_equal_loops_over_heads():
    g = torch.Generator().manual_seed(0)
    Dk, Dv, R = 5, 3, 4
    X = torch.randn(2, 6, Dk, Dv, generator=g, dtype=torch.float64)
    vecs = torch.randn(2, 6, R, Dv, generator=g, dtype=torch.float64)
    r_keys = torch.nn.Linear(Dk, R, bias=False).double()
    w_keys = torch.nn.Linear(R, Dk, bias=False).double()
    looped_read = torch.stack([torch.einsum("k,bnkv->bnv", r_keys.weight[h], X) for h in range(R)], dim=2)
    looped_write = sum(torch.einsum("k,bnv->bnkv", w_keys.weight[:, h], vecs[:, :, h]) for h in range(R))
    torch.testing.assert_close(read(r_keys, X), looped_read, rtol=0, atol=1e-12)
    torch.testing.assert_close(write(w_keys, vecs), looped_write, rtol=0, atol=1e-12)


def test_residual_is_a_dk_by_dv_matrix_per_token():
    cfg = small(d_key=5, d_value=3)
    assert live(cfg).residual(torch.zeros(2, T, dtype=torch.long)).shape == (2, T, 5, 3)


def test_matrix_norm_normalises_over_the_whole_matrix():
    X = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for kind in ("rmsnorm", "layernorm"):
        norm = MatrixNorm(4, 5, kind).double()
        torch.nn.init.normal_(norm.weight)
        torch.testing.assert_close(norm(X).flatten(-2), flat_norm(X.flatten(-2), norm.weight, kind, 1e-6))


PAPER_ROWS = {"46m": 45.9, "134m": 134.2, "206m": 206.2, "305m": 304.9}


@pytest.mark.parametrize("preset", PAPER_ROWS)
def test_parameter_counts_reproduce_the_papers_scaling_rows(preset):
    cfg = models.make_config("rmt", preset)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.pos_encoding) == (50257, 512, "learned")
    assert round(paper_num_params(cfg) / 1e6, 1) == PAPER_ROWS[preset]
    # every parameter = the itemised sum + the 2L + 1 norm gains (the meta count is checked in the contract test)
    assert num_params(cfg) - paper_num_params(cfg) == (2 * cfg.n_layers + 1) * cfg.d_key * cfg.d_value


@pytest.mark.parametrize("pos,per_layer,once", [("learned", 6, 3), ("alibi", 6, 2)])
def test_changing_dk_changes_the_count_by_the_key_parameters_only(pos, per_layer, once):
    a = models.make_config("rmt", "134m", pos_encoding=pos)
    b = models.make_config("rmt", "134m", pos_encoding=pos, d_key=a.d_key + 16)
    assert paper_num_params(b) - paper_num_params(a) == (per_layer * a.n_layers + once) * a.rank * 16
    with torch.device("meta"):
        counted = [sum(p.numel() for p in models.build(c).parameters()) for c in (a, b)]
    norms = (2 * a.n_layers + 1) * a.d_value * 16  # the 2L + 1 gains of Dk·Dv grow with Dk too
    assert counted[1] - counted[0] == (per_layer * a.n_layers + once) * a.rank * 16 + norms


def test_flops_per_token_counts_the_forwards_matmuls():
    """6 × forward MACs = 3 × the forward FLOPs torch's counter sees (matmuls and attention)."""
    for pos in ("learned", "alibi"):
        cfg = small(d_key=6, d_value=8, rank=4, d_ff=20, max_seq_len=16, vocab_size=50, pos_encoding=pos)
        model = models.build(cfg, seed=0)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(3, 16, dtype=torch.long))
        assert 3 * counter.get_total_flops() == pytest.approx(flops_per_token(cfg, 16) * 3 * 16, rel=1e-12)


# --- gradients, init (§8.5–6) ---------------------------------------------------------------------

def test_gradcheck_float64_tiny():
    cfg = small(d_key=3, d_value=2, rank=2, n_layers=1, d_ff=4, vocab_size=11, max_seq_len=5)
    model = live(cfg)
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def f(*ps):  # noqa: ANN002, ANN202
        out = torch.func.functional_call(model, dict(zip(names, ps)), (tokens,))
        return out.sum() + out.pow(2).sum()

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7)


def test_init_moments_follow_table_1():
    """Storage multiplies an input's variance by R·σ², retrieval by Dk·σ² (spec Table 1), at init."""
    cfg = models.make_config("rmt", "tiny", d_key=64, d_value=16, rank=48)
    model = models.build(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, cfg.d_key, cfg.d_value, generator=g)
    vecs = torch.randn(64, 8, cfg.rank, cfg.d_value, generator=g)
    emb_write, ffn_read = model.tok_embeddings.write, model.layers[0].ffn.read
    with torch.no_grad():
        stored, retrieved = write(emb_write, vecs), read(ffn_read, X)
    assert emb_write.weight.std().item() == pytest.approx(cfg.init_std / math.sqrt(cfg.rank), rel=0.05)
    assert ffn_read.weight.std().item() == pytest.approx(cfg.init_std / math.sqrt(cfg.d_key), rel=0.05)
    assert stored.var().item() == pytest.approx(cfg.rank * emb_write.weight.var().item(), rel=0.1)
    assert retrieved.var().item() == pytest.approx(cfg.d_key * ffn_read.weight.var().item(), rel=0.1)
    out_write = model.layers[0].attn.write.weight
    assert out_write.std().item() == pytest.approx(cfg.init_std / math.sqrt(cfg.rank * 2 * cfg.n_layers), rel=0.1)


def test_initial_loss_is_ln_vocab_with_the_zero_unembedding():
    cfg = models.make_config("rmt", "tiny", vocab_size=97, max_seq_len=32)
    model = models.build(cfg, seed=0)
    tokens = torch.randint(0, 97, (2, 32))
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    assert loss.item() == pytest.approx(math.log(97), abs=1e-6)
    assert not model.output.proj.weight.any()


def test_zero_init_query_zeroes_only_the_query_keys():
    model = models.build(models.make_config("rmt", "tiny", zero_init_query=True), seed=0)
    assert not model.layers[1].attn.read_q.weight.any() and model.layers[1].attn.read_k.weight.any()


def test_alibi_kv_cache_decoding_equals_the_full_forward():
    model = live(small(pos_encoding="alibi", max_seq_len=12))
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, cache = model(tokens), model.new_cache()
        steps = torch.stack([model.step(tokens[:, t], cache) for t in range(12)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("field,value,allowed", [
    ("d_key", 0, "positive int"), ("d_value", -1, "positive int"), ("rank", 0, "positive int"),
    ("d_ff", 0, "positive int"), ("pos_encoding", "rope", "learned, alibi"),
    ("norm", "batchnorm", "rmsnorm, layernorm"),
])
def test_bad_fields_name_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"RMTConfig\.{field}.*{allowed}"):
        models.make_config("rmt", "tiny", **{field: value})


def test_the_training_loss_adds_the_z_loss_where_gradients_flow_only():
    from parallel.step import ModelLoss, lm_loss

    spec = models.get_spec("rmt")
    cfg = small(z_loss_coef=0.5)
    model = live(cfg)
    tokens = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(2))
    loss_fn = ModelLoss(lm_loss, z_loss=spec.z_loss(cfg))
    logits = model(tokens[:, :-1])
    ce = lm_loss(logits, tokens[:, 1:])
    want = ce + 0.5 * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()  # the loss runs in fp32
    torch.testing.assert_close(loss_fn(logits, tokens[:, 1:]), want)
    (term,) = loss_fn.take_aux_terms()
    torch.testing.assert_close(term, want - ce)
    with torch.no_grad():  # evaluation: cross-entropy alone
        torch.testing.assert_close(loss_fn(model(tokens[:, :-1]), tokens[:, 1:]), ce.detach())
    assert not loss_fn.take_aux_terms()
