"""Optimizer groups: matrices decay, gains and biases do not, and an arch's sparse lookup tables
(ModelSpec.table_params) get their own group with optim.table_lr_multiplier and optim.table_weight_decay,
kept through the warm-up/cosine schedule."""
from __future__ import annotations

import functools

import torch

import models
from parallel.engine import EngineConfig, param_groups, table_group
from parallel.schedule import warmup_cosine


def _groups(model: torch.nn.Module, **table_options) -> dict[str, dict]:
    cfg = EngineConfig(micro_batch=1, grad_accum=1, dp=1, lr=2e-3, weight_decay=0.1,
                       table_params=models.get_spec("memoryformer").table_params, **table_options)
    return {g["name"]: g for g in param_groups(model, cfg.weight_decay, cfg.lr, table_group(cfg))}


def test_memoryformer_tables_get_their_own_group():
    model = models.build(models.make_config("memoryformer", "tiny", vocab_size=64), seed=0)
    groups = _groups(model, table_lr_multiplier=3.0, table_weight_decay=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    tables = {names[id(p)] for p in groups["tables"]["params"]}
    assert tables == {n for n in names.values() if n.endswith(".memory.tables")} and len(tables) == 2 * 5
    assert groups["tables"]["lr"] == 3 * 2e-3 and groups["tables"]["weight_decay"] == 0.0
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert decay == {"tok_embeddings.weight", "output.weight"} and groups["decay"]["lr"] == 2e-3
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])  # gains, biases
    assert sum(len(g["params"]) for g in groups.values()) == len(names)


def test_table_decay_defaults_to_weight_decay_and_the_schedule_keeps_the_ratio():
    model = models.build(models.make_config("memoryformer", "tiny", vocab_size=64), seed=0)
    groups = list(_groups(model, table_lr_multiplier=3.0).values())
    assert groups[-1]["name"] == "tables" and groups[-1]["weight_decay"] == 0.1
    opt = torch.optim.AdamW(groups, lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(warmup_cosine, warmup_steps=2, total_steps=10,
                                                                     min_ratio=0.1))
    for _ in range(4):
        opt.step()
        sched.step()
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert abs(lrs["tables"] - 3 * lrs["decay"]) < 1e-15 and lrs["decay"] > 0


def test_an_arch_without_tables_has_the_two_groups():
    model = models.build(models.make_config("transformer", "tiny", vocab_size=64), seed=0)
    cfg = EngineConfig(micro_batch=1, grad_accum=1, dp=1, table_params=models.get_spec("transformer").table_params)
    assert [g["name"] for g in param_groups(model, 0.1, 1e-3, table_group(cfg))] == ["decay", "no_decay"]
