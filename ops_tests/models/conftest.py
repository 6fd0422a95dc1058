import pytest
import torch

import models


@pytest.fixture
def tiny_cfg():
    # Smaller than the "tiny" preset's vocab/context so CPU tests stay well under a second each.
    return models.make_config("transformer", "tiny", vocab_size=256, max_seq_len=64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
