import pytest
import torch

import models


def test_future_tokens_never_change_past_logits(tiny_cfg):
    model = models.build(tiny_cfg).eval()
    T = 24
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, T))
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 5, 11, T - 2):
            changed = tokens.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % tiny_cfg.vocab_size
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            # ...and the change is seen at the position itself, so the check above is not vacuous.
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


def test_later_positions_see_earlier_tokens(tiny_cfg):
    model = models.build(tiny_cfg).eval()
    tokens = torch.randint(0, tiny_cfg.vocab_size, (1, 16))
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % tiny_cfg.vocab_size
    with torch.no_grad():
        diff = (model(changed) - model(tokens)).abs().amax(dim=-1)[0]
    assert (diff[1:] > 1e-5).all()  # attention actually mixes in the past


def test_too_long_sequence_is_refused(tiny_cfg):
    model = models.build(tiny_cfg)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, tiny_cfg.max_seq_len + 1, dtype=torch.long))
