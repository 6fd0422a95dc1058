import torch
import torch.nn.functional as F

import models


def test_tiny_model_overfits_one_batch(tiny_cfg):
    model = models.build(tiny_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    tokens = torch.randint(0, tiny_cfg.vocab_size, (4, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for _ in range(30):
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(tiny_cfg.vocab_size)).item()) < 0.5  # sane init
    assert losses[-1] < 0.5 * losses[0], losses
