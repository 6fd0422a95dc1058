"""`models/generation.py` (issue 19, must-show 4): for every architecture with a cache, temperature-0
generation through the cache equals greedy decoding by repeated full forwards; the nucleus and the seed."""
from __future__ import annotations

import pytest
import torch

import models
from models.generation import can_generate, generate, sample_next
from test_models_contract import GENERATING, _logits, _visible, tiny


def greedy_by_full_forwards(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(n):
        nxt = _logits(model(tokens))[:, -1].argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens


@pytest.mark.parametrize("arch", GENERATING)
def test_temperature_zero_equals_greedy_by_full_forwards(arch: str):
    model = _visible(models.build(tiny(arch), seed=5)).double().eval()
    prompt = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = greedy_by_full_forwards(model, prompt, 12)
    got = generate(model, prompt, 12)
    assert torch.equal(got, want)
    assert len(set(got[0, 5:].tolist())) > 1  # not a degenerate constant continuation


def test_nucleus_seed_and_stop():
    logits = torch.tensor([[3.0, 2.9, -5.0, -5.0], [0.0, 0.0, 0.0, 9.0]])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    draws = torch.stack([sample_next(logits, 1.0, 0.5, g().manual_seed(s)) for s in range(50)])
    assert set(draws[:, 0].tolist()) == {0} and set(draws[:, 1].tolist()) == {3}  # top_p 0.5: the argmax only
    wide = torch.stack([sample_next(logits, 1.0, 0.99, g().manual_seed(s)) for s in range(200)])
    assert set(wide[:, 0].tolist()) == {0, 1}  # the two likely tokens, never the unlikely ones
    model = models.build(tiny("transformer"), seed=1).eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, 10, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(a, generate(model, prompt, 10, temperature=1.0, top_p=0.9, seed=7))
    first = int(generate(model, prompt, 1)[0, -1])
    assert generate(model, prompt, 10, stop_token=first).shape[1] == 4  # stops after the stop token


def test_archs_without_a_cache_are_refused():
    model = models.build(tiny("moeut"), seed=0)
    assert not can_generate(model)
    with pytest.raises(ValueError, match="no incremental decoding"):
        generate(model, torch.tensor([[1]]), 3)
